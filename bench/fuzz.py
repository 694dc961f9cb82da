"""Fuzz every parser that reads outside bytes: 100,000+ cases in all (tests/support/fuzz.py).

Per target: cases run, how many parsed, the slowest case (limit 1 s), and the process's
peak memory after it (bounded: it must not grow with the number of cases).

    .venv/bin/python bench/fuzz.py [--cases 100000] [--json out.json] [--only TARGET]

With --only, each target still gets its share of --cases (gguf: 10 %).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support import fuzz

# a share of the budget per target, by how much there is to explore (and how slow a case is)
_SHARE = {
    "frames": 0.2,
    "stream": 0.1,
    "messages": 0.3,
    "txt": 0.1,
    "address": 0.05,
    "gguf": 0.1,
    "pins": 0.05,
    "chats": 0.05,
    "config": 0.05,
    "relay": 0.05,
    "shim": 0.05,
}


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=100_000, help="total over all targets")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    parser.add_argument("--only", action="append", help="this target only (repeatable)")
    opts = parser.parse_args()
    names = [t.name for t in fuzz.targets()]
    for name in opts.only or ():
        if name not in names:
            parser.error(f"no target {name!r}; the targets are {', '.join(names)}")
    rows, failed = [], 0
    print("| target | cases | parsed | slowest case | peak RSS after | result |")
    print("|---|---|---|---|---|---|")
    for target in fuzz.targets():
        if opts.only and target.name not in opts.only:
            continue
        n = max(100, int(opts.cases * _SHARE.get(target.name, 0.1)))
        t0 = time.monotonic()
        try:
            fuzz.run(target, n)
            result = "0 crashes, 0 hangs"
        except Exception as exc:  # hypothesis re-raises the minimal failing case
            failed += 1
            result = f"FAILED: {type(exc).__name__}: {str(exc)[:200]}"
        s = target.stats
        rows.append(
            {
                "target": target.name,
                "what": target.what,
                "cases": s.cases,
                "parsed": s.accepted,
                "slowest_s": s.slowest_s,
                "slowest_input": s.slowest_input,
                "rss_mib": _rss_mib(),
                "wall_s": time.monotonic() - t0,
                "result": result,
            }
        )
        print(
            f"| {target.what} | {s.cases} | {s.accepted} | {s.slowest_s * 1000:.1f} ms "
            f"| {_rss_mib():.0f} MiB | {result} |",
            flush=True,
        )
    total = sum(r["cases"] for r in rows)
    print(f"total: {total} cases, {failed} targets failed")
    if opts.json:
        opts.json.write_text(json.dumps({"total": total, "rows": rows}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
