"""Greedy decoding reads the largest logit in place; it must pick what llama.cpp's own
sampler picks. Here against a top-k 1 chain (the sampler's path), token for token."""

from __future__ import annotations

import asyncio
from pathlib import Path

from corral.engine.runtime.childproto import Done, Generate, Token
from corral.engine.runtime.inference import InferenceProcess
from corral.engine.runtime.session import LoadSettings


async def _ids(child: InferenceProcess, **sampling: object) -> list[int]:
    messages = [{"role": "user", "content": "Name three rivers and a mountain."}]
    ids = []
    async for frame in child.generate(
        Generate.chat(messages, max_tokens=48, ignore_eos=True, **sampling)
    ):
        if isinstance(frame, Token):
            ids.append(frame.id)
    return ids


def test_greedy_equals_the_samplers_argmax(smollm2: Path) -> None:
    async def run() -> tuple[list[int], list[int]]:
        child = InferenceProcess()
        try:
            await child.start()
            await child.load(LoadSettings(model=smollm2, n_ctx=512).load_params())
            fast = await _ids(child, temp=0.0)
            chain = await _ids(child, temp=1.0, top_k=1, seed=1)
            return fast, chain
        finally:
            await child.close()

    fast, chain = asyncio.run(run())
    assert len(fast) == 48
    assert fast == chain


def test_a_cancel_stops_a_long_prompt_between_batches(smollm2: Path) -> None:
    """A cancel during the prompt ends it at the next batch, not after all of it (a long
    prompt on slow workers takes a while); what was decoded stays cached."""

    async def run() -> Done:
        child = InferenceProcess()
        try:
            await child.start()
            await child.load(LoadSettings(model=smollm2, n_ctx=4096, n_batch=16).load_params())
            text = " ".join(f"item {i} is a small grey stone." for i in range(300))
            replies = child.generate(
                Generate.chat([{"role": "user", "content": text}], max_tokens=8)
            )
            first = asyncio.ensure_future(anext(replies))
            await asyncio.sleep(0.3)  # the child is decoding the prompt, 16 tokens at a time
            child.cancel()
            done = await first
            assert isinstance(done, Done), done
            return done
        finally:
            await child.close()

    done = asyncio.run(run())
    assert done.stop == "cancelled" and done.n_tokens == 0
    assert 0 < int(done.kv_used) < int(done.prompt_tokens), done  # type: ignore[call-overload]
