"""The planner against real loads: real agents, real RPC workers, llama.cpp's own log."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
from pathlib import Path

import pytest

from corral.engine.ggml.quantize import quantize
from corral.engine.localagents import LocalAgents
from corral.engine.model.spec import ModelSpec
from corral.engine.model.synthetic import TinyLlama, write_tiny_llama
from corral.engine.planner.plan import MiB
from corral.engine.runtime.childproto import Done, Generate, Token
from corral.engine.runtime.planning import layer_map_matches
from corral.engine.runtime.session import ChatSession, LoadResult, LoadSettings
from tests.conftest import corral
from tests.support.memcap import joiner, memory_capped


def _agents(agents: LocalAgents) -> list[str]:
    return [x for a in agents.addresses for x in ("--agent", a)]


def test_plan_then_chat_puts_every_layer_where_the_plan_said(
    smollm2: Path, two_agents: LocalAgents
) -> None:
    plan = corral("plan", str(smollm2), *_agents(two_agents), "--layers", "7,24", "--json")
    assert plan.returncode == 0, plan.stderr
    exact = json.loads(plan.stdout)["exact"]
    planned = {d["device"]: d["layers"] for d in exact["devices"]}
    assert planned == {"RPC0": list(range(7)), "RPC1": list(range(7, 31))}
    chat = corral(
        "chat",
        str(smollm2),
        *_agents(two_agents),
        "--layers",
        "7,24",
        "--prompt",
        "Hi",
        "--max-tokens",
        "2",
        "--json",
    )
    assert chat.returncode == 0, chat.stderr
    done = json.loads(chat.stdout.splitlines()[-1])
    # "devices" comes from llama.cpp's "layer N assigned to device X" lines
    assert {d["device"]: d["layers"] for d in done["devices"] if d["layers"]} == planned


def _load_within_tolerance(
    agents: list[str], settings: LoadSettings
) -> tuple[LoadResult, ModelSpec]:
    """Load for real (locally with no agents), then check every device's and the host's
    plan against llama.cpp's report: within max(1 %, 2 MiB), never under by more than 1 MiB."""

    async def run() -> tuple[LoadResult, ModelSpec | None]:
        session = ChatSession(agents)
        try:
            return await session.open(settings), session.spec
        finally:
            await session.close()

    result, spec = asyncio.run(run())
    assert result.comparison is not None and spec is not None
    for name, planned, actual, _ in result.comparison.rows():
        assert abs(planned - actual) <= max(0.01 * actual, 2 * MiB), (name, planned, actual)
        assert actual - planned <= MiB, f"{name}: planned under what llama.cpp used"
    return result, spec


def test_exact_plan_is_within_tolerance_of_what_llama_cpp_reports(
    tiny_model: Path, two_agents: LocalAgents
) -> None:
    for fa in (False, True):
        _load_within_tolerance(
            two_agents.addresses, LoadSettings(model=tiny_model, n_ctx=1024, flash_attn=fa)
        )


def test_a_model_that_cannot_fit_is_refused_before_any_load(
    smollm2: Path, two_agents: LocalAgents
) -> None:
    plan = corral("plan", str(smollm2), *_agents(two_agents), "--reserve", "100000000")
    assert plan.returncode == 2
    assert "RPC0: does not fit" in plan.stderr and "short by" in plan.stderr
    chat = corral(
        "chat", str(smollm2), *_agents(two_agents), "--reserve", "100000000", "--prompt", "Hi"
    )
    assert chat.returncode == 2
    assert "does not fit" in chat.stderr and "loaded" not in chat.stderr


def test_bad_layer_counts_are_a_clear_error(smollm2: Path, two_agents: LocalAgents) -> None:
    done = corral("plan", str(smollm2), *_agents(two_agents), "--layers", "10,10")
    assert done.returncode == 2 and "must add up to 31" in done.stderr
    done = corral("plan", str(smollm2), "--layers", "ten")
    assert done.returncode == 2 and "is not a list of layer counts" in done.stderr


@pytest.mark.parametrize(
    ("tied", "wtype"),
    [(True, ""), (False, ""), (True, "q4_0"), (False, "q4_0")],
    ids=["tied", "untied", "tied-q4_0", "untied-q4_0"],
)
def test_a_local_plan_is_exact_on_the_host(tmp_path: Path, tied: bool, wtype: str) -> None:
    """No agents: every layer and the output layer on the host. With tied embeddings the
    output layer uses token_embd itself there (it was counted twice: +12 % for SmolLM2);
    Q4_0 weights are also copied into llama.cpp's extra CPU buffers (CPU_REPACK, AMX) where
    the CPU-kernel self-test keeps them on, which the plan counts."""
    model = write_tiny_llama(
        tmp_path / "m.gguf", TinyLlama(n_layer=4, n_vocab=8000, tied_embeddings=tied)
    )
    if wtype:
        model = quantize(model, tmp_path / f"m-{wtype}.gguf", wtype, threads=1)
    _load_within_tolerance([], LoadSettings(model=model, n_ctx=512))


def test_a_local_plan_over_the_hosts_memory_is_refused_with_what_would_fit(
    smollm2: Path,
) -> None:
    plan = corral("plan", str(smollm2), "--ctx", "4000000")
    assert plan.returncode == 2, plan.stderr
    assert "host memory: does not fit" in plan.stderr and "short by" in plan.stderr
    ctx = re.search(r"fits with --ctx (\d+)", plan.stderr)
    assert ctx, plan.stderr
    chat = corral("chat", str(smollm2), "--ctx", "4000000", "--prompt", "Hi")
    assert chat.returncode == 2 and "host memory: does not fit" in chat.stderr
    assert "tok/s" not in chat.stdout  # refused before any load
    smaller = corral("plan", str(smollm2), "--ctx", ctx.group(1))  # what it said fits, fits
    assert smaller.returncode == 0, smaller.stderr


def test_a_split_plan_is_refused_where_the_desktops_own_memory_is_short(
    smollm2: Path, two_agents: LocalAgents
) -> None:
    """Split over two agents, the desktop capped at 1 GiB (a memory cgroup, as a container
    has): at a 128k context the host's KQ mask alone needs more, and the plan says so;
    without the cap the same plan fits."""
    args = ["plan", str(smollm2), *_agents(two_agents), "--ctx", "131072"]
    assert corral(*args).returncode == 0
    with memory_capped(1 << 30) as tasks:
        capped = corral(*args, preexec_fn=joiner(tasks))
    assert capped.returncode == 2, capped.stdout + capped.stderr
    assert "this desktop host memory: does not fit" in capped.stderr, capped.stderr
    assert "RPC0" not in capped.stderr  # the agents' devices have room


@pytest.fixture(scope="module")
def gemma3_swa(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Interleaved sliding-window attention: 12 layers, a window of 64, five windowed
    layers then one global (gemma3's pattern)."""
    spec = TinyLlama(
        arch="gemma3",
        sliding_window=64,
        n_layer=12,
        n_embd=256,
        n_head=4,
        n_head_kv=2,
        n_ff=512,
        n_vocab=1000,
    )
    return write_tiny_llama(tmp_path_factory.mktemp("gemma3") / "g3.gguf", spec)


@pytest.mark.parametrize("swa_full", [True, False], ids=["full", "window"])
@pytest.mark.parametrize("split", [False, True], ids=["local", "split"])
def test_sliding_window_models_are_planned_exactly_with_either_cache(
    gemma3_swa: Path, two_agents: LocalAgents, swa_full: bool, split: bool
) -> None:
    result, spec = _load_within_tolerance(
        two_agents.addresses if split else [],
        LoadSettings(model=gemma3_swa, n_ctx=1024, swa_full=swa_full),
    )
    assert [layer.index for layer in spec.layers if not layer.is_swa] == [5, 11]
    assert spec.n_swa == 64 and result.plan is not None
    kv = sum(u.kv for u in result.plan.usage) + result.plan.host.kv
    # per layer and cell: K and V rows of 2 heads x 64 dims in f16; windowed layers hold
    # the window and one ubatch (64 + 512, padded to 768 cells) instead of 1024
    per_cell = 2 * 2 * 64 * 2
    swa_cells = 1024 if swa_full else 768
    assert kv == per_cell * (10 * swa_cells + 2 * 1024)


def test_a_windowed_cache_reads_a_chat_edited_behind_the_window_again(gemma3_swa: Path) -> None:
    """With only the window cached, a second prompt that leaves the first far behind its
    last window cannot reuse their shared prefix (the cells it would attend to are gone:
    decoding against them changes the logits): it is read again from its start, and the
    reply equals a fresh load's. A prompt that goes on from the end of the last reuses the
    cache as before; with the full cache the far edit reuses the shared prefix too."""

    async def reply(session: ChatSession, text: str) -> tuple[str, int]:
        out, cached = [], -1
        async for frame in session.child.generate(
            Generate.chat([{"role": "user", "content": text}], max_tokens=12, temp=0.0)
        ):
            if isinstance(frame, Token):
                out.append(frame.text)
            elif isinstance(frame, Done):
                cached = int(frame.cached_tokens)
        return "".join(out), cached

    # the first chat runs past the cache's 768 cells (its oldest cells are evicted); the
    # second shares only its first ~100 tokens, so the cells before them are gone
    long_a = "a b c d e f g h i j k l m n o p " * 52 + "first"
    long_b = "a b c d e f g h i j k l m n o p " * 6 + "z y x w v u t s r q " * 8 + "second"

    async def run(swa_full: bool) -> tuple[int, int, str, str]:
        settings = LoadSettings(model=gemma3_swa, n_ctx=1024, swa_full=swa_full)
        edited, fresh = ChatSession([]), ChatSession([])
        try:
            await edited.open(settings)
            await reply(edited, long_b)
            _, onward = await reply(edited, long_b + " and more")  # goes on from the end
            await reply(edited, long_a)
            again, cached = await reply(edited, long_b)  # edited far behind the window
            await fresh.open(settings)
            first_time, _ = await reply(fresh, long_b)
            return onward, cached, again, first_time
        finally:
            await edited.close()
            await fresh.close()

    onward, cached, again, first_time = asyncio.run(run(False))
    assert onward > 0 and cached == 0 and again == first_time
    # with the full cache the far edit reuses the shared prefix; its reply is not compared
    # with a fresh load's: the batches differ, and so may float sums on another CPU
    onward, cached, _, _ = asyncio.run(run(True))
    assert onward > 0 and cached > 0


@pytest.mark.parametrize("split", [False, True], ids=["local", "split"])
def test_a_mixture_of_experts_is_planned_exactly(
    tmp_path: Path, two_agents: LocalAgents, split: bool
) -> None:
    """Mixtral's layout (a router, 4 experts of which 2 run per token), quantized so the
    stacked expert matrices go through the quantizer too."""
    src = write_tiny_llama(
        tmp_path / "moe.gguf",
        TinyLlama(n_expert=4, n_layer=6, n_embd=256, n_head=4, n_head_kv=2, n_ff=512, n_vocab=2000),
    )
    model = quantize(src, tmp_path / "moe-q8_0.gguf", "q8_0", threads=1)
    result, spec = _load_within_tolerance(
        two_agents.addresses if split else [], LoadSettings(model=model, n_ctx=1024)
    )
    assert spec.moe and spec.n_expert == 4
    logged = {str(il): p.device for p in result.placements for il in p.layers}
    assert result.plan is not None and not layer_map_matches(result.plan, logged)


@pytest.mark.parametrize(
    "shape",
    [
        TinyLlama(n_layer=4, n_embd=384, n_head=4, n_head_kv=4, head_dim=96, n_ff=768),
        TinyLlama(n_layer=4, n_embd=512, n_head=2, n_head_kv=1, head_dim=256, n_ff=1024),
        TinyLlama(n_layer=3, n_embd=256, n_head=4, n_head_kv=2, n_ff=512, n_vocab=152064),
    ],
    ids=["hd96", "hd256-gqa2", "vocab152k"],
)
@pytest.mark.parametrize("split", [False, True], ids=["local", "split"])
def test_other_head_dims_and_a_large_vocabulary_are_planned_exactly(
    tmp_path: Path, two_agents: LocalAgents, shape: TinyLlama, split: bool
) -> None:
    model = write_tiny_llama(tmp_path / "m.gguf", dataclasses.replace(shape, dtype="f16"))
    _load_within_tolerance(
        two_agents.addresses if split else [], LoadSettings(model=model, n_ctx=1024)
    )


def test_a_device_holding_only_the_output_layer_is_planned_exactly(
    tmp_path: Path, two_agents: LocalAgents
) -> None:
    """llama.cpp's dry run overstates the compute buffer of every later device by
    16 x n_embd x n_ubatch, except one that holds only the output layer: there it is
    allocated (was planned 3.0 MiB under, on the CPU and on an H200)."""
    shape = TinyLlama(n_layer=4, n_embd=384, n_head=4, n_head_kv=4, head_dim=96, n_ff=768)
    model = write_tiny_llama(tmp_path / "m.gguf", dataclasses.replace(shape, dtype="f16"))
    result, _ = _load_within_tolerance(
        two_agents.addresses, LoadSettings(model=model, n_ctx=512, layers=(4, 1))
    )
    assert result.plan is not None and result.plan.layers_of(1) == [4]


def test_the_speed_strategy_measures_instead_of_an_even_share(
    smollm2: Path, two_agents: LocalAgents, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--strategy speed` once did what balanced did, silently, then gave every device an
    even share with a warning; now it measures and predicts (tests/runtime/test_speed_plan.py
    shows the choice it makes)."""
    monkeypatch.setenv("CORRAL_SPEEDS_DIR", str(tmp_path))
    done = corral("plan", str(smollm2), *_agents(two_agents), "--strategy", "speed")
    assert done.returncode == 0, done.stderr
    said = done.stdout + done.stderr
    assert "no device speeds" not in said and "predicted:" in said, said
