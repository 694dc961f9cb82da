"""Greedy decoding reads the largest logit in place; it must pick what llama.cpp's own
sampler picks. Here against a top-k 1 chain (the sampler's path), token for token."""

from __future__ import annotations

import asyncio
from pathlib import Path

from corral.engine.runtime.inference import InferenceProcess
from corral.engine.runtime.session import LoadSettings


async def _ids(child: InferenceProcess, **sampling: object) -> list[int]:
    messages = [{"role": "user", "content": "Name three rivers and a mountain."}]
    ids = []
    async for frame in child.generate(
        messages=messages, max_tokens=48, ignore_eos=True, **sampling
    ):
        if frame["op"] == "token":
            ids.append(frame["id"])
    return ids


def test_greedy_equals_the_samplers_argmax(smollm2: Path) -> None:
    async def run() -> tuple[list[int], list[int]]:
        child = InferenceProcess()
        try:
            await child.start()
            await child.load(**LoadSettings(model=smollm2, n_ctx=512).child_params())
            fast = await _ids(child, temp=0.0)
            chain = await _ids(child, temp=1.0, top_k=1, seed=1)
            return fast, chain
        finally:
            await child.close()

    fast, chain = asyncio.run(run())
    assert len(fast) == 48
    assert fast == chain
