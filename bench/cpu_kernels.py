"""What each remedy for a broken fast CPU kernel costs: llama-bench on the CPU, side by side.

For each model, each build (`--bin NAME:DIR`, DIR holding llama-bench) and each setting of
llama.cpp's extra CPU buffers (`--repack 1` = AMX / CPU_REPACK on, `0` = off, what Corral's
self-test falls back to), prompt (pp) and generation (tg) speed, rounds interleaved so the
machine's noise hits every row alike; prints the median of the rounds and the ratio to the
first row of each model, and writes JSON with --out.

  python bench/cpu_kernels.py --bin native:/tmp/cpu-native/bin --bin noamx:/tmp/cpu-noamx/bin \
      --model /tmp/m-q4_0.gguf --model /tmp/m-q4_k_m.gguf --threads 8 --rounds 5

docs/CPU-KERNELS.md has the figures from an H200 host (AMX that works) and the command.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path


def _one(
    bin_dir: Path, model: Path, repack: int, threads: int, pp: int, tg: int
) -> dict[str, float]:
    out = subprocess.run(
        [
            str(bin_dir / "llama-bench"),
            "-m",
            str(model),
            "-ngl",
            "0",
            "-t",
            str(threads),
            "-p",
            str(pp),
            "-n",
            str(tg),
            "-r",
            "2",
            "--repack",
            str(repack),
            "-o",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if out.returncode != 0:
        raise SystemExit(f"llama-bench failed ({out.returncode}): {out.stderr[-2000:]}")
    speeds: dict[str, float] = {}
    for row in json.loads(out.stdout):
        kind = "pp" if row["n_prompt"] else "tg"
        speeds[kind] = float(row["avg_ts"])
    return speeds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bin", action="append", required=True, metavar="NAME:DIR")
    parser.add_argument("--model", action="append", required=True, type=Path)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--pp", type=int, default=128)
    parser.add_argument("--tg", type=int, default=32)
    parser.add_argument("--out", type=Path)
    opts = parser.parse_args()
    builds = [(b.split(":", 1)[0], Path(b.split(":", 1)[1])) for b in opts.bin]
    rows = [(m, name, d, r) for m in opts.model for name, d in builds for r in (1, 0)]
    seen: dict[tuple[str, str, int], list[dict[str, float]]] = {}
    for i in range(opts.rounds):
        # rotate the order each round: no row always runs first (cold caches) or last
        k = i % len(rows)
        for model, name, bin_dir, repack in rows[k:] + rows[:k]:
            got = _one(bin_dir, model, repack, opts.threads, opts.pp, opts.tg)
            seen.setdefault((model.name, name, repack), []).append(got)
    results = []
    for model in opts.model:
        base: dict[str, float] = {}
        print(f"\n{model.name} (CPU, {opts.threads} threads, median of {opts.rounds} rounds)")
        head = ("build", "extra buffers", "pp t/s", "tg t/s", "pp ×", "tg ×")
        print("  {:<10} {:<14} {:>9} {:>9} {:>6} {:>6}".format(*head))
        for name, _ in builds:
            for repack in (1, 0):
                runs = seen[(model.name, name, repack)]
                pp = statistics.median(r["pp"] for r in runs)
                tg = statistics.median(r["tg"] for r in runs)
                base = base or {"pp": pp, "tg": tg}
                print(
                    f"  {name:<10} {'on' if repack else 'off':<14} {pp:9.1f} {tg:9.1f} "
                    f"{pp / base['pp']:6.3f} {tg / base['tg']:6.3f}"
                )
                results.append(
                    {
                        "model": model.name,
                        "build": name,
                        "extra_buffers": bool(repack),
                        "pp": pp,
                        "tg": tg,
                        "runs": runs,
                    }
                )
    if opts.out:
        opts.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
