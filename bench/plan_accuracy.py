"""Planned vs real memory, and planned vs real layer map, over many model shapes.

For each shape x split x context x flash attention: plan (analytic), dry-run (exact), load
for real across two local agents (split even and uneven) or on the desktop alone (local:
every layer and the output layer in host memory), and compare per device and for host
memory with what llama.cpp logged. Writes a markdown report.

    .venv/bin/python bench/plan_accuracy.py [--out docs/PLANNER-results.md] [--quick]
                                            [--splits even,uneven,local] [--families]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import platformdirs

from corral.engine.ggml.quantize import quantize
from corral.engine.localagents import LocalAgents
from corral.engine.model import default_model_path
from corral.engine.model.synthetic import TinyLlama, write_tiny_llama
from corral.engine.planner.plan import MiB
from corral.engine.runtime.planning import layer_map_matches, overcounted_devices
from corral.engine.runtime.session import ChatSession, LoadSettings

SHAPES: dict[str, tuple[TinyLlama | None, str]] = {
    "SmolLM2-135M q4_1, tied": (None, ""),
    "GQA 1, hd 64, 8 L, f16": (
        TinyLlama(
            n_layer=8, n_embd=512, n_head=8, n_head_kv=8, n_ff=1376, n_vocab=4000, dtype="f16"
        ),
        "f16",
    ),
    "GQA 4, hd 128, 16 L, q8_0": (
        TinyLlama(
            n_layer=16, n_embd=1024, n_head=8, n_head_kv=2, n_ff=2816, n_vocab=8000, dtype="f16"
        ),
        "q8_0",
    ),
    "GQA 8, hd 128, 32 L, q4_0": (
        TinyLlama(
            n_layer=32, n_embd=1024, n_head=8, n_head_kv=1, n_ff=2048, n_vocab=4000, dtype="f16"
        ),
        "q4_0",
    ),
    "GQA 4, hd 80, 12 L, q4_K": (
        TinyLlama(
            n_layer=12,
            n_embd=640,
            n_head=8,
            n_head_kv=2,
            head_dim=80,
            n_ff=1792,
            n_vocab=4000,
            dtype="f16",
        ),
        "q4_k_m",
    ),
    "GQA 4, hd 64, 80 L, f16": (
        TinyLlama(
            n_layer=80, n_embd=256, n_head=4, n_head_kv=1, n_ff=512, n_vocab=1000, dtype="f16"
        ),
        "f16",
    ),
    "untied, GQA 4, hd 64, 10 L, q4_K": (
        TinyLlama(
            n_layer=10,
            n_embd=512,
            n_head=8,
            n_head_kv=2,
            n_ff=1536,
            n_vocab=8000,
            tied_embeddings=False,
            dtype="f16",
        ),
        "q4_k_m",
    ),
    "GQA 4, hd 64, 64 L, q8_0": (
        TinyLlama(
            n_layer=64, n_embd=512, n_head=8, n_head_kv=2, n_ff=1024, n_vocab=2000, dtype="f16"
        ),
        "q8_0",
    ),
}

# families beyond the dense llama (--families): interleaved sliding window with qk-norm
# (gemma3), mixtures of experts (Mixtral's layout), head dims 96 and 256, a 152k vocabulary
FAMILIES: dict[str, tuple[TinyLlama | None, str]] = {
    "gemma3 iSWA 64, GQA 2, hd 64, 12 L, f16": (
        TinyLlama(
            arch="gemma3",
            sliding_window=64,
            n_layer=12,
            n_embd=256,
            n_head=4,
            n_head_kv=2,
            n_ff=512,
            n_vocab=1000,
            dtype="f16",
        ),
        "f16",
    ),
    "gemma3 iSWA 256, GQA 8, hd 128, 18 L, q8_0": (
        TinyLlama(
            arch="gemma3",
            sliding_window=256,
            n_layer=18,
            n_embd=512,
            n_head=8,
            n_head_kv=1,
            head_dim=128,
            n_ff=2048,
            n_vocab=4000,
            dtype="f16",
        ),
        "q8_0",
    ),
    "MoE 4 experts (2 used), GQA 2, 6 L, q8_0": (
        TinyLlama(
            n_expert=4,
            n_layer=6,
            n_embd=256,
            n_head=4,
            n_head_kv=2,
            n_ff=512,
            n_vocab=2000,
            dtype="f16",
        ),
        "q8_0",
    ),
    "MoE 8 experts (2 used), GQA 4, 8 L, f16": (
        TinyLlama(
            n_expert=8,
            n_layer=8,
            n_embd=512,
            n_head=8,
            n_head_kv=2,
            n_ff=1024,
            n_vocab=4000,
            dtype="f16",
        ),
        "f16",
    ),
    "hd 96, GQA 1, 4 L, f16": (
        TinyLlama(n_layer=4, n_embd=384, n_head=4, n_head_kv=4, head_dim=96, n_ff=768, dtype="f16"),
        "f16",
    ),
    "hd 256, GQA 2, 4 L, q4_0": (
        TinyLlama(
            n_layer=4, n_embd=512, n_head=2, n_head_kv=1, head_dim=256, n_ff=1024, dtype="f16"
        ),
        "q4_0",
    ),
    "152k vocab, untied, 3 L, q8_0": (
        TinyLlama(
            n_layer=3,
            n_embd=256,
            n_head=4,
            n_head_kv=2,
            n_ff=512,
            n_vocab=152064,
            tied_embeddings=False,
            dtype="f16",
        ),
        "q8_0",
    ),
}


def model_file(name: str, spec: TinyLlama | None, ftype: str, cache: Path) -> Path:
    if spec is None:
        return default_model_path()
    slug = "".join(c if c.isalnum() else "-" for c in name).strip("-")
    out = cache / f"{slug}.gguf"
    if not out.exists():
        src = cache / f"{slug}.src.gguf"
        write_tiny_llama(src, spec)
        if ftype == "f16":
            src.rename(out)
        else:
            quantize(src, out, ftype)
            src.unlink()
    return out


@dataclass
class Row:
    case: str
    device: str
    analytic: int
    exact: int
    actual: int
    layers_ok: bool
    raw: int = 0  # llama.cpp's dry run as it reports itself (what llama-fit-params uses)
    shape: str = ""


async def run_case(
    agents: list[str], model: Path, split: str, n_ctx: int, fa: bool, swa_full: bool = True
) -> tuple[list[Row], int, str]:
    settings = LoadSettings(
        model=model, n_ctx=n_ctx, flash_attn=fa, worker_threads=1, swa_full=swa_full
    )
    session = ChatSession([] if split == "local" else agents)
    try:
        await session.connect(1)
        if split == "uneven":  # a quarter of the layers on the first device
            analytic, _ = await session.plan(settings)
            total, n_dev = len(analytic.layer_device), len(analytic.devices)
            first = max(1, total // 4)
            rest = [(total - first) // (n_dev - 1)] * (n_dev - 1)
            rest[-1] += total - first - sum(rest)
            settings = dataclasses.replace(settings, layers=(first, *rest))
        result = await session.open_after_connect(settings)
    finally:
        await session.close()
    assert result.plan is not None and result.analytic is not None
    assert result.comparison is not None
    logged = {str(il): p.device for p in result.placements for il in p.layers}
    ok = not layer_map_matches(result.plan, logged)
    rows = []
    plan, analytic, comp = result.plan, result.analytic, result.comparison
    assert session.spec is not None
    overcounted = overcounted_devices(plan)
    over = 16 * session.spec.n_embd * plan.settings.n_ubatch
    for i, name in enumerate(comp.names):
        a = analytic.usage[i] if i < len(plan.devices) else analytic.host
        exact = comp.planned[i].total
        raw = exact + (over if i in overcounted else 0)
        rows.append(Row("", name.split(" ")[0], a.total, exact, comp.actual[i].total, ok, raw))
    return (
        rows,
        len(plan.layer_device),
        ",".join(str(len(plan.layers_of(i))) for i in range(len(plan.devices))),
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/PLANNER-results.md"))
    parser.add_argument("--quick", action="store_true", help="two shapes only")
    parser.add_argument(
        "--families",
        action="store_true",
        help="the other model families (sliding window, experts, head dims, a large "
        "vocabulary) instead of the dense llama shapes; sliding-window models run with the "
        "full and the windowed cache",
    )
    parser.add_argument(
        "--splits",
        default="even,uneven,local",
        help="which loads: even and uneven over two agents, local on the desktop alone",
    )
    opts = parser.parse_args()
    unknown = set(opts.splits.split(",")) - {"even", "uneven", "local"}
    if unknown:
        parser.error(f"--splits: unknown {', '.join(sorted(unknown))} (even, uneven, local)")
    cache = Path(platformdirs.user_cache_dir("corral")) / "bench-models"
    cache.mkdir(parents=True, exist_ok=True)
    shapes = list((FAMILIES if opts.families else SHAPES).items())
    if (
        not opts.families and not default_model_path().exists()
    ):  # e.g. on a lent GPU machine: random shapes only
        print(f"skipping SmolLM2: {default_model_path()} is missing (make models)")
        shapes = shapes[1:]
    shapes = shapes[: 2 if opts.quick else None]
    all_rows: list[Row] = []
    lines = [
        "| case | device | analytic MiB | exact MiB | actual MiB | analytic err | "
        "exact err | layer map |",
        "|---|---|---|---|---|---|---|---|",
    ]
    with LocalAgents(2) as agents:
        for name, (spec, ftype) in shapes:
            model = model_file(name, spec, ftype, cache)
            caches = (True, False) if spec is not None and spec.sliding_window else (True,)
            for split, n_ctx, fa, swa_full in itertools.product(
                opts.splits.split(","), (512, 4096), (False, True), caches
            ):
                rows, _, counts = asyncio.run(
                    run_case(agents.addresses, model, split, n_ctx, fa, swa_full)
                )
                how = f"{split} {counts}" if counts else split
                case = f"{name}; {how}; ctx {n_ctx}; FA {'on' if fa else 'off'}"
                if len(caches) > 1:
                    case += "; SWA cache " + ("full" if swa_full else "window")
                for r in rows:
                    r.case, r.shape = case, name
                    ae = (r.analytic - r.actual) / r.actual
                    ee = (r.exact - r.actual) / r.actual
                    lines.append(
                        f"| {case} | {r.device} | {r.analytic / MiB:.2f} | {r.exact / MiB:.2f} "
                        f"| {r.actual / MiB:.2f} | {ae * 100:+.1f}% | {ee * 100:+.2f}% | "
                        f"{'equal' if r.layers_ok else 'DIFFERS'} |"
                    )
                    case = ""
                all_rows.extend(rows)
                print(lines[-len(rows)].split("|")[1].strip() or name, flush=True)
    exact_err = [abs(r.exact - r.actual) / r.actual for r in all_rows]
    raw_err = [(r.raw - r.actual) / r.actual for r in all_rows]
    analytic_err = [abs(r.analytic - r.actual) / r.actual for r in all_rows]
    bad_exact = [
        r
        for r in all_rows
        if abs(r.exact - r.actual) > max(0.01 * r.actual, 2 * MiB) or r.actual - r.exact > MiB
    ]
    summary = [
        f"{len(all_rows)} device rows over {len({r.case for r in all_rows if r.case})} loads; "
        f"layer map equal to llama.cpp's log in "
        f"{sum(r.layers_ok for r in all_rows)}/{len(all_rows)} rows.",
        f"exact (dry run) vs actual: median {statistics.median(exact_err) * 100:.2f}%, "
        f"worst {max(exact_err) * 100:.2f}%; rows outside max(1%, 2 MiB) or under by more "
        f"than 1 MiB: {len(bad_exact)}.",
        f"llama.cpp's own dry run as reported (llama-fit-params' method) vs actual: median "
        f"{statistics.median(abs(e) for e in raw_err) * 100:.2f}%, worst "
        f"{max(raw_err, key=abs) * 100:+.2f}% (16 x n_embd x n_ubatch too much on every "
        "device after the first).",
        f"analytic vs actual: median {statistics.median(analytic_err) * 100:.1f}%, worst "
        f"{max(analytic_err) * 100:.1f}%; rows within 5%: "
        f"{sum(e <= 0.05 for e in analytic_err)}/{len(analytic_err)}.",
    ]
    for name, _ in shapes:
        errs = [(r.analytic - r.actual) / r.actual for r in all_rows if r.shape == name]
        summary.append(
            f"- {name}: analytic within 5% in {sum(abs(e) <= 0.05 for e in errs)}/{len(errs)} "
            f"rows, worst {max(errs, key=abs) * 100:+.1f}%"
        )
    opts.out.write_text(
        "\n".join(["<!-- written by bench/plan_accuracy.py -->", "", *summary, "", *lines, ""])
    )
    print("\n".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
