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

    .venv/bin/python bench/replay_probes.py place-gpu.log placement-gpu.json [--ran median]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from corral.engine.runtime.speeds import base_of, centre, derive

_UNIT = 1_000_000
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


def _then(blocks: tuple[int, int], scale: tuple[float, float], g: list[float], base: float):
    """A device's figures as derive made them before 12-06's sixth session: every hop cut
    to zero where it came out negative."""
    per_byte = max(g[1] - g[0], 0.0) / (blocks[1] - blocks[0])
    return {
        "hop": max(g[0] - per_byte * blocks[0] - base, 0.0),
        "layer": per_byte * scale[0],
        "output": max(g[2] - g[1], 0.0) * scale[1],
    }


def _now(blocks: tuple[int, int], scale: tuple[float, float], g: list[float], base: float):
    sp = derive(blocks, scale, g, g, (base, base))
    return {"hop": sp.hop, "layer": sp.layer, "output": sp.output}


def replay(
    result: dict, timings: list[list[list[float]]], rule: Callable, now: bool, ran: Callable
) -> list:
    """Predicted tokens/s of each of `result`'s rows, from `timings` (the set-up's desktop
    probes, then its devices' in order) read by `rule`, the figures derived as derive does
    `now`, or as it did before; `ran`: the rule the run itself read its passes by (its
    figures give back the probes' bytes)."""
    devices = result["speeds"]["devices"]
    names = list(devices)
    desk, per_device = timings[0], timings[1:]
    figures = {}
    base = None  # the desktop's own part, once (speeds.base_of, the same then and now)
    for name, probes in zip(names, per_device, strict=True):
        sp = devices[name]
        fast = [ran(p) for p in probes]
        q = sp["layer"] / max(fast[1] - fast[0], 1e-12)  # average block / (large - 1-layer)
        s = sp["output"] / (fast[2] - fast[1]) if fast[2] > fast[1] else 0.0
        # the probes' block bytes in units of 1e-6 of their difference, the 1-layer probe's
        # block taken as one average block
        blocks = (round(q * _UNIT), round((1 + q) * _UNIT))
        if base is None:
            d = [rule(p) for p in desk]
            base = base_of(blocks, d, d)[0]
        figures[name] = (_now if now else _then)(
            blocks, (q * _UNIT, s), [rule(p) for p in probes], base
        )
    # planner.speed.step_time's sum, which needs the model's spec (its output layer where
    # none was measured); every device here had its output measured
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
    parser.add_argument(
        "--ran",
        choices=("fastest", "median"),
        default="fastest",
        help="how the run read its probes' passes: fastest up to abc93ac (every device run "
        "so far), median at e0e6280 (runs since derive resolves a negative hop cannot be "
        "replayed: their figures do not give back the probes' bytes)",
    )
    opts = parser.parse_args()
    try:
        runs = probe_runs(opts.log.read_text())
        results = json.loads(opts.json.read_text())["results"]
        return show(results, runs, fastest if opts.ran == "fastest" else median)
    except (OSError, ValueError, KeyError, TypeError, IndexError, ZeroDivisionError) as exc:
        parser.error(
            f"cannot replay this run ({type(exc).__name__}: {exc}): give bench/placement.py's "
            "output and its --json, of a run since the probes' passes are logged"
        )


READINGS = {  # name: (how a probe's passes are read, figures derived as now)
    "fastest, then": (fastest, False),  # the run's own, before 12-06's sixth session
    "median, then": (median, False),
    "as now": (median, True),  # the median, and a negative hop resolved by `speeds._line`
}


def show(results: list, runs: list[list[list[float]]], ran: Callable) -> int:
    for result in results:
        n = len(result["speeds"]["devices"]) + 1
        if len(runs) < n:
            print(f"{result['setup']}: its probe timings are not in the log", file=sys.stderr)
            return 1
        timings, runs = runs[:n], runs[n:]
        rates = {k: replay(result, timings, *how, ran) for k, how in READINGS.items()}
        print(
            f"\n{result['setup']}: split, measured tok/s, predicted by the run; "
            + ", ".join(READINGS)
        )
        errors: dict[str, list[float]] = {k: [] for k in READINGS}
        for i, row in enumerate(result["rows"]):
            m = row["measured"]
            cells = []
            for k in READINGS:
                r = rates[k][i]
                errors[k].append(abs(r / m - 1))
                cells.append(f"{r:6.1f} ({100 * (r / m - 1):+.1f} %)")
            print(f"  {row['counts']}: {m:6.1f}, {row['predicted']:6.1f}; " + ", ".join(cells))
        for k, errs in errors.items():
            print(
                f"  {k}: within 15 % {sum(e <= 0.15 for e in errs)}/{len(errs)}, "
                f"error median {100 * statistics.median(errs):.1f} %, max {100 * max(errs):.1f} %"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
