"""Cache types x flash attention x head sizes on the CPU backend, over two real agents.

Every combination the validator allows is loaded for real and generates 8 tokens (a
subprocess per case): allowed means it runs. Every combination it refuses exits 2 before
anything loads.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.engine.localagents import LocalAgents
from corral.engine.model.spec import read_model_spec
from corral.engine.model.synthetic import TinyLlama, write_tiny_llama
from corral.engine.planner.plan import Settings
from corral.engine.planner.validate import check_cache, errors
from tests.conftest import corral

TYPES = ("f16", "bf16", "q8_0", "q4_0", "iq4_nl", "q5_1")
HEADS = {
    64: TinyLlama(n_layer=2, n_embd=128, n_head=2, n_head_kv=1, n_ff=128),
    80: TinyLlama(n_layer=2, n_embd=160, n_head=2, n_head_kv=1, n_ff=128),
}
CASES = list(itertools.product(HEADS, TYPES, TYPES, (False, True)))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("heads")
    return {hd: write_tiny_llama(root / f"hd{hd}.gguf", spec) for hd, spec in HEADS.items()}


@pytest.fixture(scope="module")
def agents() -> Iterator[list[str]]:
    with LocalAgents(2) as running:
        yield running.addresses


@pytest.mark.parametrize(
    ("head_dim", "k", "v", "fa"),
    CASES,
    ids=[f"hd{h}-{k}-{v}-{'fa' if fa else 'nofa'}" for h, k, v, fa in CASES],
)
def test_allowed_runs_and_refused_never_loads(
    models: dict[int, Path], agents: list[str], head_dim: int, k: str, v: str, fa: bool
) -> None:
    model = models[head_dim]
    allowed = not errors(
        check_cache(read_model_spec(model), Settings(type_k=k, type_v=v, flash_attn=fa), [])
    )
    args = [
        "chat",
        str(model),
        "--prompt",
        "hi",
        "--max-tokens",
        "8",
        "--ignore-eos",
        "--ctx",
        "512",
        "--cache-type-k",
        k,
        "--cache-type-v",
        v,
        "--flash-attn",
        "on" if fa else "off",
        "--json",
    ]
    for a in agents:
        args += ["--agent", a]
    done = corral(*args)
    if allowed:
        assert done.returncode == 0, done.stdout[-500:] + done.stderr[-2000:]
        assert '"tokens": 8' in done.stdout.splitlines()[-1]
    else:
        assert done.returncode == 2, done.stdout[-500:] + done.stderr[-1000:]
        assert "refused before loading" in done.stdout
