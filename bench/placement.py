"""Placement by measured speed against measurement: for set-ups of 3-4 real agents whose
links and workers differ, every split of a sample is loaded and timed, and set beside its
prediction and the splits `speed` and `balanced` choose.

    .venv/bin/python bench/placement.py [--model M] [--setups a,b,c] [--step 8] [--passes 2]
        [--json F]

Set-ups (each agent a real corral-agent with its RPC worker; links through bench/linkem.py):
  threads  3 agents, workers with 2, 1 and 1 threads, no delay
  delays   3 agents, one thread each, links of 0, 1 and 5 ms each way
  mixed    4 agents, threads 2/1/1/1, links 0 / 1 ms / 5 ms / 0 ms at 50 Mbit/s

For each: the splits are every layer count in steps of --step over the agents (each share 0
or more, the output layer with the last), plus each one-agent split, plus speed's and
balanced's choices; each is loaded and generates --tokens tokens --rounds times (the median
tokens/s), once in each of --passes passes over all of them, and keeps its fastest pass: a
moment when a shared machine's neighbours are busy then slows one pass of every split, not
every round of one (the probes are likewise timed in turn until they settle, the fastest
kept).
Reported: speed's choice over the best measured split (target >= 0.95), the prediction's
error on every split (target within 15 %), balanced beside them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from corral.engine.localagents import LocalAgents
from corral.engine.model.catalog import default_model_path
from corral.engine.model.spec import read_model_spec
from corral.engine.planner.speed import NOISY, predict
from corral.engine.runtime.childproto import Done, Generate
from corral.engine.runtime.errors import InferenceCrashed
from corral.engine.runtime.session import ChatSession, LoadSettings
from corral.engine.runtime.speeds import (
    GEN_REPS,
    PROBE_BATCH,
    PROBE_VOCAB,
    cache_dir,
    probe_key,
    probe_params,
    write_probe,
)

# per agent: worker threads (0: one per core, -n: n fewer), one-way delay ms, Mbit/s (0: no
# limit), the devices it shares ("": its default), and optionally its environment
SETUPS = {
    "threads": [(2, 0.0, 0.0, ""), (1, 0.0, 0.0, ""), (1, 0.0, 0.0, "")],
    # threads with libgomp's own spin count (300,000) in every worker, as before rpc_spin's
    # default (30,000): whether a worker's spinning threads take the cores the next one needs
    "threads-oldspin": [
        (2, 0.0, 0.0, "", {"GOMP_SPINCOUNT": "300000"}),
        (1, 0.0, 0.0, "", {"GOMP_SPINCOUNT": "300000"}),
        (1, 0.0, 0.0, "", {"GOMP_SPINCOUNT": "300000"}),
    ],
    "delays": [(1, 0.0, 0.0, ""), (1, 1.0, 0.0, ""), (1, 5.0, 0.0, "")],
    "mixed": [(2, 0.0, 0.0, ""), (1, 1.0, 0.0, ""), (1, 5.0, 0.0, ""), (1, 0.0, 50.0, "")],
    # one agent: the probe's figures against the whole model on one device
    "single": [(2, 0.0, 0.0, "")],
    # a GPU host: one agent's worker on the GPU, one on the CPU
    "gpu-cpu": [(0, 0.0, 0.0, "CUDA0"), (0, 0.0, 0.0, "CPU")],
    # diagnoses of gpu-cpu's splits that end on the CPU (the output layer there ran slower
    # than its probe): the CPU worker leaving two cores to the rest of the host; libgomp's
    # own spin count (300,000; bench/omp_spin.c says what that costs a CPU) instead of
    # rpc_spin's default
    "gpu-cpu-spare2": [(0, 0.0, 0.0, "CUDA0"), (-2, 0.0, 0.0, "CPU")],
    "gpu-cpu-oldspin": [
        (0, 0.0, 0.0, "CUDA0", {"GOMP_SPINCOUNT": "300000"}),
        (0, 0.0, 0.0, "CPU", {"GOMP_SPINCOUNT": "300000"}),
    ],
}


def splits(n_total: int, k: int, step: int) -> list[tuple[int, ...]]:
    """Layer counts over k devices adding up to n_total, each a multiple of `step` (the last
    takes the rest), plus every one-device split."""
    out = set()
    grid = range(0, n_total + 1, step)
    for head in itertools.product(grid, repeat=k - 1):
        rest = n_total - sum(head)
        if rest >= 0:
            out.add((*head, rest))
    for i in range(k):
        out.add(tuple(n_total if j == i else 0 for j in range(k)))
    return sorted(out)


async def timed(session: ChatSession, tokens: int, rounds: int) -> float:
    """Median generated tokens a second of `rounds` replies."""
    rates = []
    for _ in range(rounds):
        request = Generate(prompt="Once upon a time", max_tokens=tokens, temp=0.0, ignore_eos=True)
        done = None
        async for frame in session.child.generate(request):
            if isinstance(frame, Done):
                done = frame
        assert done is not None and done.gen_s > 0
        rates.append(done.n_tokens / done.gen_s)
    return statistics.median(rates)


def start_agents(stack: contextlib.ExitStack, agents_spec: list) -> list[str]:
    """Real agents of a set-up (each its own LocalAgents, slowed through linkem.py where it
    has a delay or a rate), stopped with `stack`: their addresses."""
    addresses = []
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="corral-place-")))
    for i, (threads, delay, mbit, device, *more) in enumerate(agents_spec):
        if threads < 0:
            threads = max(1, (os.cpu_count() or 1) + threads)
        config = tmp / f"agent{i}.toml"
        config.write_text(
            f"rpc_threads = {threads}\n" + (f'devices = ["{device}"]\n' if device else "")
        )
        # the desktop sees no GPU of its own (main); an agent sharing one sees it
        env = dict(more[0]) if more else {}
        if device.startswith("CUDA"):
            env["CUDA_VISIBLE_DEVICES"] = "0"
        agents = stack.enter_context(
            LocalAgents(1, extra_args=("--config", str(config)), env=env or None)
        )
        address = agents.addresses[0]
        if delay or mbit:
            relay = subprocess.Popen(
                [
                    sys.executable,
                    str(Path(__file__).with_name("linkem.py")),
                    address,
                    *(str(delay), str(mbit)),
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            stack.callback(relay.kill)
            assert relay.stdout is not None
            address = relay.stdout.readline().split()[-1]
        addresses.append(address)
    return addresses


async def run_curve(name: str, model: Path, layers: list[int], tokens: int, log: list[str]):
    """Each device's step time on probes of `layers` layers and on the whole model alone,
    with the desktop's child at one thread per core and at one thread: whether a layer's
    time is the same at every probe size and the same as in the model. Every probe is timed
    before the model is loaded, as a deploy with speed does."""
    spec = read_model_spec(model)
    out: dict = {"setup": name, "model": str(model), "devices": []}
    with contextlib.ExitStack() as stack:
        addresses = start_agents(stack, SETUPS[name])
        session = ChatSession(addresses)
        try:
            await session.connect(0)
            _, plan = await session.plan(LoadSettings(model=model, n_ctx=512))
            n_dev = len(plan.devices)
            n_total = sum(len(plan.layers_of(i)) for i in range(n_dev))
            probes = {}
            for n in layers:
                path = Path(cache_dir()) / "curve" / f"{probe_key(spec)}-{n}.gguf"
                path.parent.mkdir(parents=True, exist_ok=True)
                if not path.exists():  # off the loop: minutes for the 7.24B's, and a loop
                    # that stalls past the heartbeat loses its agents (and their tunnels)
                    await asyncio.to_thread(write_probe, spec, n, PROBE_VOCAB, path)
                probes[n] = path
            used = [i for i in range(n_dev) if plan.devices[i].endpoint]
            rows = {i: {"device": plan.devices[i].name, "probe": {}, "model": {}} for i in used}
            for i, child_threads in itertools.product(used, (0, 1)):
                times = {}
                for n, path in probes.items():
                    best = float("inf")
                    for _ in range(2):
                        params = probe_params(path, session.endpoints, i, n_dev, child_threads)
                        await session.child.load(params)
                        g, _b = await session.child.time_steps((1, PROBE_BATCH), 15)
                        best = min(best, g)
                    times[n] = best
                rows[i]["probe"][child_threads] = times
            for i, child_threads in itertools.product(used, (0, 1)):
                row = rows[i]
                counts = tuple(n_total if j == i else 0 for j in range(n_dev))
                await session.open_after_connect(
                    LoadSettings(model=model, n_ctx=512, layers=counts, n_threads=child_threads)
                )
                g, _b = await session.child.time_steps((1, PROBE_BATCH), 15)
                rate = await timed(session, tokens, 3)
                row["model"][child_threads] = {"step_s": g, "tok_s": rate}
                times = row["probe"][child_threads]
                sizes = sorted(times)
                slopes = [
                    f"{a}->{b}: {1e3 * (times[b] - times[a]) / (b - a):.3f}"
                    for a, b in itertools.pairwise(sizes)
                ]
                line = (
                    f"{name} {row['device']} child threads {child_threads or 'all'}: "
                    + ", ".join(f"{n} layers {1e3 * t:.2f} ms" for n, t in times.items())
                    + f" | ms/layer {', '.join(slopes)} | model {spec.n_layer} layers: "
                    f"step {1e3 * g:.2f} ms ({1e3 * g / spec.n_layer:.3f} ms/layer), "
                    f"generating {rate:.1f} tok/s"
                )
                print(line, flush=True)
                log.append(line)
            out["devices"] = list(rows.values())
        finally:
            await session.close(stop_workers=True)
    return out


async def run_setup(
    name: str, model: Path, step: int, tokens: int, rounds: int, passes: int, log: list[str]
) -> dict:
    agents_spec = SETUPS[name]
    with contextlib.ExitStack() as stack:
        addresses = start_agents(stack, agents_spec)
        session = ChatSession(addresses)
        try:
            await session.connect(0)
            base = LoadSettings(model=model, n_ctx=512)
            n_total = 0
            rows = []

            async def measure(settings: LoadSettings, label: str) -> dict:
                result = await session.open_after_connect(settings)
                plan = result.plan
                assert session.spec is not None
                speeds = session.speeds
                pred = predict(session.spec, plan, speeds) if speeds else None
                counts = [len(plan.layers_of(i)) for i in range(len(plan.devices))]
                rate = await timed(session, tokens, rounds)
                # the same loaded split's bare decode (TimeSteps without generate): what a
                # reply's token costs beyond it is the scheduler's own step (logits read,
                # sampled, sent on), which the probes time since 12-06 (before, they timed
                # bare decodes, and the replies ran 0.2-1.3 ms a token slower on this VM)
                (step,) = await session.child.time_steps((1,), GEN_REPS)
                # and as the probes time theirs (a reply's tokens through the child's step,
                # its frames dropped): beside the prediction it tells the model from its
                # probes; beside the reply, a reply's cost beyond the child (its frames to the
                # desktop's process)
                (as_probe,) = await session.child.time_steps((1,), GEN_REPS, True)
                row = {
                    "label": label,
                    "counts": counts,
                    "measured": rate,
                    "passes": [rate],
                    "predicted": pred.tokens_per_s if pred else None,
                    # the share the probes' noise leaves the prediction uncertain by (the plan
                    # flags it above NOISY)
                    "uncertainty": pred.uncertainty if pred else None,
                    "decode_alone": 1 / step,
                    "as_probe": 1 / as_probe,
                }
                report(row, 1)
                return row

            def report(row: dict, n: int) -> None:
                rate, counts, label = row["measured"], row["counts"], row["label"]
                err = (row["predicted"] / rate - 1) if row["predicted"] else float("nan")
                line = f"{name} {label:<9} {counts} measured {rate:6.1f} tok/s, predicted "
                line += f"{row['predicted'] or 0:6.1f} ({100 * err:+.1f} %, "
                line += f"± {100 * (row['uncertainty'] or 0):.1f} %), a bare decode "
                line += f"{row['decode_alone']:6.1f}, timed as a probe {row['as_probe']:6.1f}"
                line += f", pass {n}: {row['passes'][-1]:.1f}" if n > 1 else ""
                print(line, flush=True)
                log.append(line)

            chosen = await measure(dataclasses.replace(base, strategy="speed"), "speed")
            n_total = sum(chosen["counts"])
            if session.speeds is not None:
                for dev, sp in session.speeds.devices.items():
                    print(
                        f"  {dev}: layer {sp.layer * 1e3:.3f} ms, step {sp.hop * 1e3:.3f} ms, "
                        f"output {sp.output * 1e3:.3f} ms, "
                        f"layer noise {sp.noise_layer * 1e3:.3f} ms"
                    )
                for host, link in session.speeds.links.items():
                    print(f"  {host}: rtt {link.rtt * 1e3:.2f} ms, {link.bandwidth / 1e6:.0f} MB/s")
                sp_all = session.speeds
                print(
                    f"  passing between devices: {sp_all.switch * 1e3:.3f} ms a step for each "
                    f"after the first (noise {sp_all.switch_noise * 1e3:.3f} ms)"
                )
            balanced = await measure(base, "balanced")
            for counts in splits(n_total, len(addresses), step):
                if counts in (tuple(chosen["counts"]), tuple(balanced["counts"])):
                    continue
                rows.append(await measure(dataclasses.replace(base, layers=counts), "split"))
            every = [chosen, balanced, *rows]
            for n in range(2, passes + 1):
                for row in every:
                    await session.open_after_connect(
                        dataclasses.replace(base, layers=tuple(row["counts"]))
                    )
                    row["passes"].append(await timed(session, tokens, rounds))
                    row["measured"] = max(row["passes"])
                    (step,) = await session.child.time_steps((1,), GEN_REPS)
                    row["decode_alone"] = max(row["decode_alone"], 1 / step)
                    (as_probe,) = await session.child.time_steps((1,), GEN_REPS, True)
                    row["as_probe"] = max(row["as_probe"], 1 / as_probe)
                    report(row, n)
            best = max(every, key=lambda r: r["measured"])
            predicted = [r for r in every if r["predicted"]]
            errors = [abs(r["predicted"] / r["measured"] - 1) for r in predicted]
            # misses beyond 15 % whose plan said it was that uncertain (not silent misses)
            flagged = sum(
                e > 0.15 and r["uncertainty"] > NOISY
                for e, r in zip(errors, predicted, strict=True)
            )
            return {
                "setup": name,
                "agents": [
                    {"threads": t, "delay_ms": d, "mbit": m, "device": dev, "env": more}
                    for t, d, m, dev, *more in agents_spec
                ],
                "passes": passes,
                "speeds": dataclasses.asdict(session.speeds) if session.speeds else None,
                "speed": chosen,
                "balanced": balanced,
                "best": best,
                "speed_vs_best": chosen["measured"] / best["measured"],
                "balanced_vs_best": balanced["measured"] / best["measured"],
                "prediction_error_median": statistics.median(errors) if errors else None,
                "prediction_error_max": max(errors) if errors else None,
                "within_15": sum(e <= 0.15 for e in errors),
                "misses_flagged": flagged,
                "splits": len(every),
                "rows": every,
            }
        finally:
            await session.close(stop_workers=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=default_model_path())
    parser.add_argument("--setups", default="threads,delays,mixed")
    parser.add_argument("--step", type=int, default=8, help="layer-count step of the sample")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--passes", type=int, default=2, help="passes over all splits; each keeps its fastest"
    )
    parser.add_argument(
        "--scale", type=int, default=1, help="multiply every worker's threads (a bigger host)"
    )
    parser.add_argument(
        "--cpu-only", action="store_true", help="agents share their CPU only (on a GPU host)"
    )
    parser.add_argument(
        "--curve",
        help="instead: each device's step on probes of these layer counts (e.g. 1,2,4,8) and "
        "on the whole model, child at all threads and at one",
    )
    parser.add_argument("--json", type=Path)
    opts = parser.parse_args()
    if opts.passes < 1 or opts.rounds < 1:
        parser.error("--passes and --rounds take 1 or more")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the agents' devices only (on a GPU host)
    logging.basicConfig(format="%(name)s: %(message)s")  # how many passes the probes took
    logging.getLogger("corral.engine.runtime.speeds").setLevel(logging.INFO)
    os.environ.setdefault("CORRAL_SPEEDS_DIR", tempfile.mkdtemp(prefix="corral-speeds-"))
    try:
        return run_all(opts)
    except InferenceCrashed as crash:  # what llama.cpp said before it aborted
        print("\n".join(["the inference child's last lines:", *crash.log_tail]), file=sys.stderr)
        raise


def run_all(opts: argparse.Namespace) -> int:
    log: list[str] = []
    results = []
    for name in opts.setups.split(","):
        if name not in SETUPS:
            print(f"no set-up {name!r}: choose from {', '.join(SETUPS)}", file=sys.stderr)
            return 2
        SETUPS[name] = [
            (t * opts.scale if t > 0 else t, d, m, dev or ("CPU" if opts.cpu_only else ""), *more)
            for t, d, m, dev, *more in SETUPS[name]
        ]
        if opts.curve:
            layers = [int(n) for n in opts.curve.split(",")]
            results.append(asyncio.run(run_curve(name, opts.model, layers, opts.tokens, log)))
            continue
        results.append(
            asyncio.run(
                run_setup(name, opts.model, opts.step, opts.tokens, opts.rounds, opts.passes, log)
            )
        )
    if opts.curve:
        if opts.json:
            opts.json.write_text(json.dumps(results, indent=1))
        return 0
    print()
    print(
        "| set-up | splits | speed's choice | its tok/s | best measured | speed / best | "
        "balanced / best | prediction error median / max | within 15 % | misses flagged |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['setup']} | {r['splits']} | {r['speed']['counts']} | "
            f"{r['speed']['measured']:.1f} | {r['best']['counts']} {r['best']['measured']:.1f} | "
            f"{r['speed_vs_best']:.3f} | {r['balanced_vs_best']:.3f} | "
            f"{100 * (r['prediction_error_median'] or 0):.1f} % / "
            f"{100 * (r['prediction_error_max'] or 0):.1f} % | {r['within_15']}/{r['splits']} | "
            f"{r['misses_flagged']}/{r['splits'] - r['within_15']} |"
        )
    if opts.json:
        opts.json.write_text(json.dumps({"model": str(opts.model), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
