"""The speed probes read what the model reads: its weight types in its proportions, and its
output layer's type (a CPU may read one k-quant several times slower a byte than another,
so a probe of one type mispredicts a mixed model). Real files: a random llama quantized by
llama.cpp to Q4_K_M (its own mix), and the probes built for it by llama.cpp's quantizer."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import fcntl
import functools
import os
from pathlib import Path

import pytest

from corral.engine.ggml.quantize import quantize
from corral.engine.model.spec import ModelSpec, read_model_spec
from corral.engine.model.synthetic import TinyLlama, write_tiny_llama
from corral.engine.protocol import GpuInfo
from corral.engine.runtime.speeds import (
    device_key,
    host_driver,
    probe_bytes,
    probe_files,
    probe_key,
    probe_layers,
    probe_types,
    sweep_partial_probes,
)

Q4_K, Q6_K = 12, 14  # ggml types


def _types(spec: ModelSpec) -> collections.Counter[tuple[str, int]]:
    return collections.Counter(wt for layer in spec.layers for wt in layer.weight_types)


def test_probes_carry_the_models_weight_types_and_output_type(tmp_path: Path) -> None:
    src = write_tiny_llama(
        tmp_path / "m.gguf",
        TinyLlama(n_layer=8, n_embd=256, n_head=4, n_head_kv=2, n_ff=512, tied_embeddings=False),
    )
    model = read_model_spec(quantize(src, tmp_path / "m-q4_k_m.gguf", "q4_k_m", threads=1))
    mine = _types(model)
    # llama.cpp's Q4_K_M: some layers' ffn_down and attn_v Q6_K, the rest Q4_K, output Q6_K
    assert mine[("ffn_down.weight", Q6_K)] and mine[("ffn_down.weight", Q4_K)]
    assert model.output_type == Q6_K

    one, large, vocab = (read_model_spec(p) for p in probe_files(model, tmp_path / "p"))
    n_large = probe_layers(model)
    assert (one.n_layer, large.n_layer, vocab.n_layer) == (1, n_large, n_large)
    # the large probe: the model's proportions (all 8 of its layers' worth, here)
    assert n_large == model.n_layer and _types(large) == mine
    assert _types(vocab) == mine
    # the 1-layer probe: the model's most common layer
    assert _types(one) in [collections.Counter(layer.weight_types) for layer in model.layers]
    # the output layer is timed in the model's own type, at the model's vocabulary
    assert vocab.output_type == Q6_K and vocab.n_vocab == model.n_vocab
    blocks, out_scale = probe_bytes(model, probe_files(model, tmp_path / "p"))
    assert blocks == (one.weight_bytes, model.weight_bytes)  # it reads what the model reads
    assert abs(out_scale - 1.0) < 1e-9  # same type, same shape: nothing to scale


def test_a_probe_of_fewer_layers_keeps_the_proportions(tmp_path: Path) -> None:
    """Where the model is larger than the probe, its mix is shared out by largest
    remainders: Q4_K_M's half of layers with Q6_K ffn_down stays half."""
    src = write_tiny_llama(
        tmp_path / "m.gguf",
        TinyLlama(n_layer=8, n_embd=256, n_head=4, n_head_kv=2, n_ff=512, tied_embeddings=False),
    )
    model = read_model_spec(quantize(src, tmp_path / "m-q4_k_m.gguf", "q4_k_m", threads=1))
    heavy = sum(("ffn_down.weight", Q6_K) in layer.weight_types for layer in model.layers)
    for n in (2, 4, 6):
        types = probe_types(model, n)
        down = [t for p, t in types if "ffn_down" in p]
        assert len(down) == n
        assert down.count(Q6_K) == round(heavy * n / model.n_layer)


def test_another_mix_is_another_probe(tmp_path: Path) -> None:
    """The cache key names the mix: the same shape quantized otherwise gets its own probes
    (and its own measured speeds)."""
    src = write_tiny_llama(
        tmp_path / "m.gguf", TinyLlama(n_layer=4, n_embd=256, n_ff=512, tied_embeddings=False)
    )
    mixed = read_model_spec(quantize(src, tmp_path / "a.gguf", "q4_k_m", threads=1))
    pure = read_model_spec(quantize(src, tmp_path / "b.gguf", "q4_k_s", threads=1, pure=True))
    assert probe_key(mixed) != probe_key(pure)
    assert probe_key(mixed) == probe_key(read_model_spec(tmp_path / "a.gguf"))


def test_a_new_gpu_driver_is_measured_again() -> None:
    """speeds.json's key holds the host's GPU driver: figures taken under another driver are
    not reused; a host without one keeps the key it had before drivers were counted."""
    gpus = (GpuInfo(0, "H100", driver="580.159.04"), GpuInfo(1, "H100", driver="580.159.04"))
    newer = tuple(dataclasses.replace(g, driver="590.10") for g in gpus)
    assert host_driver(gpus) == "580.159.04" and host_driver(()) == ""
    key = functools.partial(device_key, "agent", "0", "CUDA : ARCHS = 900", 0, "probe")
    assert key(host_driver(gpus)) != key(host_driver(newer))
    assert key(host_driver(gpus)) == key(host_driver(gpus))
    assert key("") == device_key("agent", "0", "CUDA : ARCHS = 900", 0, "probe")


def test_a_probe_writer_dies_with_the_desktop_that_started_it(
    smollm2: Path, tmp_path: Path
) -> None:
    """A desktop killed while it builds a probe (seconds to minutes of writing and
    quantizing) leaves no writer behind to finish for nobody. The probe here is 1,200 layers
    of SmolLM2's shape: a minute or more of work, killed half a second in."""
    import signal
    import subprocess
    import sys
    import time

    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path\n"
            "from corral.engine.model.spec import read_model_spec\n"
            "from corral.engine.runtime.speeds import write_probe\n"
            "spec = read_model_spec(sys.argv[1])\n"
            "write_probe(spec, 40 * spec.n_layer, spec.n_vocab, Path(sys.argv[2]))\n",
            str(smollm2),
            str(tmp_path / "probe.gguf"),
        ]
    )
    try:
        writer = 0
        deadline = time.monotonic() + 60
        while not writer and time.monotonic() < deadline and parent.poll() is None:
            children = Path(f"/proc/{parent.pid}/task/{parent.pid}/children")
            with contextlib.suppress(OSError):
                writer = int((children.read_text().split() or ["0"])[0])
            time.sleep(0.05)
        assert writer, "the probe writer never started (or finished at once)"
        time.sleep(0.5)  # past its die_with_parent
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 10
        while Path(f"/proc/{writer}").exists() and time.monotonic() < deadline:
            with contextlib.suppress(OSError):  # a zombie of init's counts as gone
                if "State:\tZ" in Path(f"/proc/{writer}/status").read_text():
                    break
            time.sleep(0.05)
        alive = Path(f"/proc/{writer}/status")
        assert not alive.exists() or "State:\tZ" in alive.read_text(), "the writer lived on"
        # what it wrote so far stays until the next desktop builds probes there, which
        # removes it; a writer at work (its lock held) is left alone
        left = list(tmp_path.glob("writing-*"))
        assert left, "the killed writer's folder was not where it is looked for"
        busy = tmp_path / "writing-busy"
        busy.mkdir()
        held = os.open(busy / ".lock", os.O_CREAT | os.O_RDWR)
        fcntl.flock(held, fcntl.LOCK_EX)
        try:
            assert sweep_partial_probes(tmp_path) == len(left)
        finally:
            os.close(held)
        assert [p.name for p in tmp_path.glob("writing-*")] == ["writing-busy"]
    finally:
        if parent.poll() is None:
            parent.kill()
        with contextlib.suppress(ProcessLookupError, UnboundLocalError):
            if writer:
                os.kill(writer, signal.SIGKILL)


def test_a_probe_keeps_the_median_of_its_passes_and_one_out_of_line_counts_for_nothing() -> None:
    """A probe's figure is the median of its passes, not the fastest: on a noisy host one
    fast pass (the H100 host's 9.6 ms among 10.1-11.8) made the splits look 13-23 %
    faster than they ran. Its spread leaves out the pass farthest from the median."""
    from corral.engine.runtime.speeds import centre

    assert centre([1.0, 2.0]) == (1.5, 1.0)
    assert centre([1.0, 1.1, 5.0]) == pytest.approx((1.1, 0.1))  # a slow spell left out
    assert centre([0.2, 1.0, 1.1]) == pytest.approx((1.0, 0.1))  # a fast one too
    mid, spread = centre([10.7, 11.2, 9.6, 10.1, 11.0, 11.8])
    assert mid == pytest.approx(10.85) and spread == pytest.approx(1.7)
    assert centre([3.0])[1] == float("inf")


def settled(timings: list, views: tuple | None = None) -> bool:
    """The probes' rule (speeds.another_pass): both columns' noise within SETTLED."""
    from corral.engine.runtime.speeds import SETTLED, noise

    return all(noise(timings, views, k) <= SETTLED for k in (0, 1))


def test_probes_stop_once_settled_or_once_another_pass_no_longer_narrows_them() -> None:
    """Two passes at least; then until settled, at most six, and from the third on only
    while the last pass narrowed the spread: a busy host's probes once ran all six passes
    and took the window's speed plan past two minutes without getting surer."""
    from corral.engine.runtime.speeds import MAX_PASSES, another_pass

    assert another_pass([]) and another_pass([0.5])
    assert not another_pass([0.5, 0.03])  # settled
    assert another_pass([0.5, 0.2])  # a third pass drops the worst
    assert another_pass([0.5, 0.2, 0.1])  # narrowing
    assert not another_pass([0.5, 0.2, 0.25])  # no longer narrowing: the plan says ±
    assert not another_pass([0.5, 0.4, 0.3, 0.2, 0.1, 0.05][:MAX_PASSES])


def test_a_probe_is_timed_again_until_its_passes_agree() -> None:
    """The rule time_device keeps timing by, without weights: each probe's passes
    (generated and batch) within 4 % of their median; one slow pass out of three does not
    count against it."""
    assert settled([[(1.00, 5.0), (1.03, 5.1)]])
    assert not settled([[(1.00, 5.0), (1.30, 5.1)]])  # generated steps 30 % apart
    assert not settled([[(1.00, 5.0), (1.02, 6.0)]])  # batches 20 % apart
    assert settled([[(1.00, 5.0), (3.00, 9.0), (1.03, 5.1)]])  # the slow spell left out
    assert not settled([[(1.00, 5.0)]])  # one timing settles nothing


def test_probes_settle_by_how_far_they_move_the_prediction() -> None:
    """With views (`sensitivity`), the probes settle when their spreads move every view a
    plan takes of the device (one layer, the whole model, the large probe's count; each
    with and without the output layer) by at most 4 %: the 7.24B's shape on a GPU (5 of 33
    layers in the large probe) counts the large and the 1-layer probe's noise eightfold, so
    timings that each agree within 2 % do not settle it."""
    from corral.engine.runtime.speeds import noise, sensitivity

    views = sensitivity((100, 500), (100.0, 1.0), 33, 3)
    assert (-7.0, 7.0, 1.0) in views  # the whole model with the output layer
    assert (1.0, 0.0, 0.0) in views and (0.0, 1.0, 0.0) in views  # one layer; the large probe
    small = [(1.00, 9.0), (1.02, 9.1)]
    large = [(1.50, 20.0), (1.53, 20.2)]
    vocab = [(1.60, 21.0), (1.61, 21.1)]
    # the whole model: -7 * 1.01 + 7 * 1.515 + 1.605 = 5.14 ms, moved by
    # 7 * 0.02 + 7 * 0.03 + 0.01 = 0.36 ms (7 %)
    assert noise([small, large, vocab], views) > 0.07
    assert not settled([small, large, vocab], views)
    # the 1-layer and the large probe steadier: the whole model moved by 0.007 + 0.014 +
    # 0.01 (0.6 %); one layer with the output layer by 0.001 + 0.002 + 0.01 (1 %)
    steady = [[(1.00, 9.0), (1.001, 9.0)], [(1.50, 20.0), (1.502, 20.0)], vocab]
    assert noise(steady, views) < 0.011 and settled(steady, views)
    # the desktop's base: two probes, no vocabulary
    assert (-7.0, 8.0) in sensitivity((100, 500), (100.0, 2.0), 33, 2)


def test_a_large_probe_as_large_as_the_model_settles_too() -> None:
    """Where the large probe is the whole model (the 1.1B's), the whole model with the
    output layer weighs only the vocabulary probe, yet every split's layer comes from the
    large probe: its own spread must settle too (a 63.4 / 68.7 ms pair was once taken)."""
    from corral.engine.runtime.speeds import sensitivity

    views = sensitivity((100, 1600), (100.0, 1.0), 16, 3)
    assert (0.0, 0.0, 1.0) in views and (0.0, 1.0, 0.0) in views
    small = [(5.0, 50.0), (5.05, 50.1)]
    vocab = [(70.0, 700.0), (70.1, 700.0)]
    assert not settled([small, [(63.4, 640.0), (68.7, 640.0)], vocab], views)
    assert settled([small, [(66.0, 640.0), (66.3, 640.0)], vocab], views)


def test_a_devices_figures_carry_its_probes_spread_as_their_noise() -> None:
    """derive's noise: the same arithmetic as the figures, each probe's spread added (a
    bound). A layer is the two probes' difference over their blocks' bytes, so it carries
    both spreads; the output layer the vocabulary and the large probe's; where the 1-layer
    probe ran from a cache, the large probe alone."""
    from corral.engine.runtime.speeds import base_noise, derive

    blocks, scale = (100, 500), (100.0, 2.0)
    sp = derive(blocks, scale, [1.0, 3.0, 3.5], [9.0, 20.0, 21.0], (0.2, 1.0), [0.04, 0.08, 0.02])
    assert sp.layer == pytest.approx(0.5)  # (3.0 - 1.0) / 400 bytes x 100
    assert sp.noise_layer == pytest.approx(0.12 / 400 * 100)
    assert sp.noise_hop == pytest.approx(0.04 + 0.12 * 100 / 400)
    assert sp.noise_hop == pytest.approx(base_noise(blocks, [0.04, 0.08]))
    assert sp.noise_output == pytest.approx((0.08 + 0.02) * 2.0)
    # a 1-layer probe faster than its block: the large probe alone, no hop
    cached = derive(blocks, scale, [0.1, 3.0, 3.5], [9.0, 20.0, 21.0], (0.2, 1.0), [0.04, 0.08])
    assert cached.hop == 0.0 and cached.noise_hop == 0.0
    assert cached.noise_layer == pytest.approx(0.08 / 500 * 100)
    assert derive(blocks, scale, [1.0, 3.0], [9.0, 20.0], (0.2, 1.0)).noise_layer == 0.0


def test_timing_generated_tokens_runs_a_real_reply_and_leaves_nothing_behind(
    smollm2: Path,
) -> None:
    """TimeSteps with `generate` times a reply's tokens through the child's own step (the
    probes' figure since a bare decode left the scheduler's part of a token out): it answers
    with one time per size, sends no frame of the reply it timed, and the next reply (and
    a prompt batch timed beside it) see an empty slot: the same text as before."""
    import asyncio

    from corral.engine.runtime.childproto import Done, Generate
    from corral.engine.runtime.inference import InferenceProcess
    from corral.engine.runtime.session import LoadSettings

    async def reply(child: InferenceProcess) -> Done:
        frames = [
            f
            async for f in child.generate(
                Generate(prompt="The river", max_tokens=12, ignore_eos=True)
            )
        ]
        assert isinstance(frames[-1], Done)
        return frames[-1]

    async def run() -> tuple[Done, list[float], Done]:
        child = InferenceProcess()
        try:
            await child.start()
            await child.load(LoadSettings(model=smollm2, n_ctx=512).load_params())
            before = await reply(child)
            times = await child.time_steps((1, 16), 8, generate=True)
            after = await reply(child)
            return before, times, after
        finally:
            await child.close()

    before, times, after = asyncio.run(run())
    assert len(times) == 2 and all(t > 0 for t in times)
    assert after.content == before.content and after.n_tokens == 12
    assert after.cached_tokens == before.cached_tokens == 0


def test_the_replay_of_a_runs_probe_timings_gives_back_its_predictions() -> None:
    """bench/replay_probes.py re-reads a placement run's logged probe passes: read as the
    fastest pass (the old rule) they give back the run's own figures, as derive makes them
    (the probes' bytes recovered from those figures; where no hop comes out negative, derive
    then and now agree); as the median, they follow the median pass."""
    import importlib.util

    from corral.engine.runtime.speeds import derive

    path = Path(__file__).parents[2] / "bench" / "replay_probes.py"
    spec = importlib.util.spec_from_file_location("replay_probes", path)
    assert spec and spec.loader
    replay = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(replay)

    desk = [[0.2, 0.3, 0.25], [0.6, 0.8, 0.7]]
    gpu = [[0.5, 0.6, 0.7], [1.5, 1.9, 1.6], [1.7, 2.0, 1.8]]
    log = "\n".join(
        "corral.engine.runtime.speeds: probes timed in 3 passes, generated-token steps (ms): "
        + "; ".join(
            f"p{i}.gguf: " + " ".join(f"{t:.3f}" for t in probe) for i, probe in enumerate(run)
        )
        for run in (desk, gpu)
    )
    runs = replay.probe_runs(log)
    assert runs[1][2] == pytest.approx([0.0017, 0.0020, 0.0018])
    blocks, scale = (100, 500), (100.0, 1.0)  # a 1-layer probe of one average block
    low = [min(p) * 1e-3 for p in gpu]
    base = min(desk[0]) * 1e-3 - (min(desk[1]) - min(desk[0])) * 1e-3 / 400 * 100
    sp = derive(blocks, scale, low, low, (base, 0.0))
    result = {
        "speeds": {"devices": {"CUDA0": dataclasses.asdict(sp)}},
        "rows": [{"counts": [9]}, {"counts": [3]}],
    }
    rates = replay.replay(result, runs, replay.fastest, False, replay.fastest)
    assert rates == pytest.approx(replay.replay(result, runs, replay.fastest, True, min))
    for counts, rate in zip((9, 3), rates, strict=True):
        step = base + sp.hop + (counts - 1) * sp.layer + sp.output
        assert rate == pytest.approx(1 / step)
    mid = [sorted(p)[1] * 1e-3 for p in gpu]  # the median pass of each probe
    d_mid = [sorted(p)[1] * 1e-3 for p in desk]
    one = {**result, "rows": [{"counts": [9]}]}
    (rate,) = replay.replay(one, runs, replay.median, True, replay.fastest)
    b = d_mid[0] - (d_mid[1] - d_mid[0]) / 4
    per = (mid[1] - mid[0]) / 4
    step = b + (mid[0] - per - b) + 8 * per + (mid[2] - mid[1])  # no hop clamped to 0
    assert mid[0] - per - b > 0
    assert rate == pytest.approx(1 / step)


def test_a_one_layer_probe_faster_than_its_block_leaves_the_large_probe_to_set_the_layer() -> None:
    """Where the 1-layer probe took less than a block's worth beyond the base (its block
    ran from a cache), the line through the two probes has a negative hop. Cut to zero it
    charged every split that much extra; now the large probe alone gives the layer's time
    over the base, the hop is zero, and the whole model on the device is predicted as its
    probes took: the VM's 1.1B worker (1-layer 2.30 ms, 16 layers 66.0 ms, base 0)."""
    from corral.engine.runtime.speeds import derive

    blocks = (100, 1600)  # the large probe: 16 blocks of the model's average, as the model
    scale = (100.0, 1.0)
    gen = [2.30e-3, 66.0e-3, 71.1e-3]
    sp = derive(blocks, scale, gen, gen, (0.0, 0.0))
    assert sp.hop == 0.0
    assert sp.layer == pytest.approx(66.0e-3 / 16)
    assert sp.hop + 16 * sp.layer + sp.output == pytest.approx(71.1e-3)  # the vocabulary probe
    # a positive intercept is kept as it was: the line through the two probes
    gen = [6.0e-3, 66.0e-3, 71.1e-3]
    sp = derive(blocks, scale, gen, gen, (1.0e-3, 1.0e-3))
    assert sp.layer == pytest.approx(60.0e-3 / 15)
    assert sp.hop == pytest.approx(6.0e-3 - 4.0e-3 - 1.0e-3)


def test_passing_between_devices_is_what_a_split_probe_took_beyond_its_parts(
    tmp_path: Path,
) -> None:
    """The chain probe: the large probe's blocks over the devices as evenly as can be (the
    output layer on the last); what it took beyond the base, each device's hop and blocks,
    and the last's output layer is charged per device after the first, never credited;
    speeds.json keeps it beside the devices, and a damaged entry counts as not measured."""
    from corral.engine.planner.speed import DeviceSpeed
    from corral.engine.runtime.speeds import (
        Chain,
        SpeedCache,
        chain_counts,
        chain_key,
        chain_of,
        switch_cost,
    )

    assert chain_counts(16, 3) == [6, 5, 6]  # 16 blocks, the output layer on the last
    assert chain_counts(5, 5) == [1, 1, 1, 1, 2]
    assert chain_counts(4, 1) == [5]
    # base 1 + hops 0.5 + 0.2 + blocks 6 x 1 + 5 x 2 + 5 x 3 + output 4 = 36.7
    parts = ([0.5, 0.2, 0.0], [1.0, 2.0, 3.0], [6, 5, 6], 4.0, 1.0)
    assert switch_cost(*parts, 42.7) == pytest.approx(3.0)
    assert switch_cost(*parts, 30.0) == 0.0  # faster than its parts: no credit
    # from the devices' figures, whose layer is a model layer's: a probe block is 1/4 of one
    # here, and the model's output layer twice the probe's
    figs = [DeviceSpeed(0.5, 4.0, 1.0, 8.0), DeviceSpeed(0.2, 8.0, 0.0, 12.0, output=8.0)]
    chain = chain_of(figs, [3, 4], 0.25, 2.0, (1.0, 2.0), 15.7, 30.0, 0.4)
    # 1 + 0.5 + 3 x 1 + 0.2 + 3 x 2 + 8 / 2 = 14.7 (blocks: 3 and 3; the output on the last)
    assert chain.switch == pytest.approx(1.0)
    assert chain.switch_batch == pytest.approx(30.0 - (2.0 + 1.0 + 6.0 + 9.0))
    assert chain.noise == pytest.approx(0.4)
    with pytest.raises(ValueError):
        chain_of([figs[0], None], [3, 4], 0.25, 2.0, (1.0, 2.0), 1.0, 1.0, 0.0)

    path = tmp_path / "speeds.json"
    cache = SpeedCache(path)
    key = chain_key(["a|0|b|t4|p", "c|0|b|t2|p"])
    cache.chains[key] = Chain(3e-3, 5e-3, 1e-4)
    cache.save()
    assert SpeedCache(path).chains == {key: Chain(3e-3, 5e-3, 1e-4)}
    kept = path.read_text().replace('"switch_batch"', '"other"')
    path.write_text(kept)
    assert SpeedCache(path).chains == {}  # damaged: measured again
