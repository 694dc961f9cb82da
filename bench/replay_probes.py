"""Replay a bench/placement.py run's probe timings with another way of reading them.

bench/placement.py logs every pass of every probe ("probes timed in N passes, generated-token
steps (ms): ...", the desktop's two probes first, then each device's three) and its --json
keeps each split's measured tokens/s and each device's derived figures. This takes both and
predicts every split again from the same timings, read as each probe's fastest pass (the
rule before the fifth H100 host run of 12-06) and as their median (`speeds.centre`, the
rule since), so the two rules are compared on one host's real timings without another
device run.

The probes' byte counts are not in the log: they are recovered from the run's own derived
figures (a layer's time over the large and the 1-layer probe's difference gives an average
block's bytes over their block bytes' difference; the output's over the vocabulary probe's
excess, its scale), taking the 1-layer probe's block as one average block. With the fastest
passes the replay gives back the run's own predictions (printed beside it, a check of that).

    .venv/bin/python bench/replay_probes.py place-gpu.log placement-gpu.json
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from corral.engine.runtime.speeds import centre

_LINE = re.compile(r"probes timed in \d+ passes, generated-token steps \(ms\): (.*)")


def probe_runs(log: str) -> list[list[list[float]]]:
    """Each logged timing: per probe, its passes in seconds."""
    out = []
    for m in _LINE.finditer(log):
        probes = []
        for part in m.group(1).split("; "):
            _, times = part.rsplit(": ", 1)
            probes.append([float(t) / 1e3 for t in times.split()])
        out.append(probes)
    return out


def fastest(values: Sequence[float]) -> float:
    return min(values)


def median(values: Sequence[float]) -> float:
    return centre(values)[0]


def replay(result: dict, timings: list[list[list[float]]], rule: Callable) -> list[float]:
    """Predicted tokens/s of each of `result`'s rows, from `timings` (the set-up's desktop
    probes, then its devices' in order) read by `rule`."""
    devices = result["speeds"]["devices"]
    names = list(devices)
    desk, per_device = timings[0], timings[1:]
    figures = {}
    base = None
    for name, probes in zip(names, per_device, strict=True):
        sp = devices[name]
        fast = [min(p) for p in probes]
        q = sp["layer"] / max(fast[1] - fast[0], 1e-12)  # average block / (large - 1-layer)
        s = sp["output"] / (fast[2] - fast[1]) if fast[2] > fast[1] else 0.0
        g = [rule(p) for p in probes]
        d0, d1 = (rule(p) for p in desk)
        if base is None:
            base = max(d0 - (d1 - d0) * q, 0.0)  # speeds.base_of, the block as an average one
        per_byte = max(g[1] - g[0], 0.0)
        figures[name] = {
            "hop": max(g[0] - per_byte * q - base, 0.0),
            "layer": per_byte * q,
            "output": max(g[2] - g[1], 0.0) * s,
        }
    rates = []
    for row in result["rows"]:
        counts = row["counts"]
        used = [i for i, c in enumerate(counts) if c > 0]
        step = base or 0.0
        for i in used:
            f = figures[names[i]]
            blocks = counts[i] - (1 if i == used[-1] else 0)
            step += f["hop"] + blocks * f["layer"] + (f["output"] if i == used[-1] else 0.0)
        rates.append(1 / step)
    return rates


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", type=Path, help="bench/placement.py's output")
    parser.add_argument("json", type=Path, help="its --json")
    opts = parser.parse_args()
    try:
        runs = probe_runs(opts.log.read_text())
        results = json.loads(opts.json.read_text())["results"]
    except (OSError, ValueError, KeyError) as exc:
        parser.error(f"cannot read the run: {exc}")
    for result in results:
        n = len(result["speeds"]["devices"]) + 1
        if len(runs) < n:
            print(f"{result['setup']}: its probe timings are not in the log", file=sys.stderr)
            return 1
        timings, runs = runs[:n], runs[n:]
        old = replay(result, timings, fastest)
        new = replay(result, timings, median)
        print(f"\n{result['setup']}: split, measured, predicted by the run / fastest / median")
        errors = {"fastest": [], "median": []}
        for row, a, b in zip(result["rows"], old, new, strict=True):
            m = row["measured"]
            errors["fastest"].append(abs(a / m - 1))
            errors["median"].append(abs(b / m - 1))
            print(
                f"  {row['counts']}: {m:6.1f} tok/s, {row['predicted']:6.1f} / {a:6.1f} "
                f"({100 * (a / m - 1):+.1f} %) / {b:6.1f} ({100 * (b / m - 1):+.1f} %)"
            )
        for rule, errs in errors.items():
            print(
                f"  {rule}: within 15 % {sum(e <= 0.15 for e in errs)}/{len(errs)}, "
                f"error median {100 * statistics.median(errs):.1f} %, max {100 * max(errs):.1f} %"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
