"""`corral serve --parallel N`: requests decode together over a real split (two agents), each
in its own slot of the context, with the official openai client."""

from __future__ import annotations

import asyncio
import re
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from corral.engine.localagents import LocalAgents
from corral.engine.planner.plan import MiB
from corral.engine.runtime.session import ChatSession, LoadSettings
from tests.support.agents import start_serve, stop

MODEL = "SmolLM2-135M-Instruct.Q4_1"
_COUNT = "Write the numbers from 1 to 1000 separated by commas."


@pytest.fixture(scope="module")
def server(smollm2: Path) -> Iterator[str]:
    # two slots of 1024 tokens each
    with LocalAgents(2) as agents:
        proc, url = start_serve(smollm2, agents.addresses, "--ctx", "2048", "--parallel", "2")
        try:
            yield url
        finally:
            stop(proc)


def _timed_stream(client: openai.OpenAI, content: str, max_tokens: int, out: dict) -> None:
    """Stream a reply, noting when each piece came and how it ended."""
    stream = client.chat.completions.create(
        model=MODEL,
        stream=True,
        max_tokens=max_tokens,
        temperature=0,
        messages=[{"role": "user", "content": content}],
        stream_options={"include_usage": True},
    )
    out["times"], out["text"] = [], []
    for chunk in stream:
        if chunk.usage is not None:
            out["usage"] = chunk.usage
        if chunk.choices and chunk.choices[0].delta.content:
            out["times"].append(time.monotonic())
            out["text"].append(chunk.choices[0].delta.content)
        if chunk.choices and chunk.choices[0].finish_reason:
            out["finish"] = chunk.choices[0].finish_reason


def _metrics(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url.removesuffix("/v1") + "/metrics", timeout=10).read()
    out = {}
    for line in text.decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_two_clients_are_answered_together_each_in_its_slot(server: str) -> None:
    client = openai.OpenAI(base_url=server, api_key="x", max_retries=0, timeout=300)
    a: dict = {}
    b: dict = {}
    first = threading.Thread(target=_timed_stream, args=(client, _COUNT, 96, a))
    second = threading.Thread(
        target=_timed_stream, args=(client, _COUNT.replace("1000", "900"), 96, b)
    )
    first.start()
    second.start()
    first.join(300)
    second.join(300)
    for out in (a, b):
        assert out["finish"] == "length" and out["usage"].completion_tokens == 96, out
        assert "".join(out["text"]).strip()
    # decoded together: each stream's tokens came while the other's were still coming (one
    # lock, as before, would have sent one reply whole before the other began)
    assert b["times"][0] < a["times"][-1] and a["times"][0] < b["times"][-1]
    overlap = [t for t in a["times"] if b["times"][0] <= t <= b["times"][-1]]
    assert len(overlap) > len(a["times"]) // 4
    seen = _metrics(server)
    assert seen["corral_slots"] == 2
    # each slot's own cache: 1024 cells each, both used by its reply
    assert seen['corral_slot_kv_cells{slot="0"}'] == seen['corral_slot_kv_cells{slot="1"}'] == 1024
    assert seen['corral_slot_kv_used{slot="0"}'] > 96 and seen['corral_slot_kv_used{slot="1"}'] > 96


def test_a_prompt_longer_than_a_slot_is_a_400_that_says_per_slot(server: str) -> None:
    client = openai.OpenAI(base_url=server, api_key="x", max_retries=0)
    long = " ".join(["word"] * 1500)  # fits the 2048-token context, not a 1024-token slot
    with pytest.raises(openai.BadRequestError, match="per slot") as err:
        client.chat.completions.create(
            model=MODEL, max_tokens=4, messages=[{"role": "user", "content": long}]
        )
    assert err.value.code == "context_length_exceeded"


def test_a_client_that_leaves_frees_its_slot_and_the_other_goes_on(server: str) -> None:
    client = openai.OpenAI(base_url=server, api_key="x", max_retries=0, timeout=300)
    kept: dict = {}
    other = threading.Thread(target=_timed_stream, args=(client, _COUNT, 128, kept))
    other.start()
    leaving = client.chat.completions.create(
        model=MODEL,
        stream=True,
        max_tokens=500,
        temperature=0,
        messages=[{"role": "user", "content": "Count to 900."}],
    )
    for n, _ in enumerate(leaving):
        if n == 8:
            break
    leaving.close()  # hangs up mid-reply: its reply is stopped, its slot freed
    other.join(300)
    assert kept["finish"] == "length" and kept["usage"].completion_tokens == 128
    # the freed slot takes the next request
    again = client.chat.completions.create(
        model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "Say hi."}]
    )
    assert again.choices[0].message.content


def test_a_short_request_is_answered_while_a_long_prompt_is_read(smollm2: Path) -> None:
    """A long prompt is read in chunks once another request runs beside it: a short request
    that comes while it is being read gets its first token before the long one's first."""
    with LocalAgents(2) as agents:
        proc, url = start_serve(smollm2, agents.addresses, "--ctx", "4096", "--parallel", "2")
        try:
            client = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=300)
            # ~1700 tokens: four batches of 512 alone
            long_prompt = " ".join(f"item {i}," for i in range(300)) + " Which came last?"
            slow: dict = {}
            quick: dict = {}
            reading = threading.Thread(target=_timed_stream, args=(client, long_prompt, 8, slow))
            reading.start()
            while _metrics(url).get("corral_replies_running", 0) < 1:
                time.sleep(0.02)
            _timed_stream(client, "Say hi.", 4, quick)
            reading.join(300)
        finally:
            _, err = stop(proc)
    assert quick["times"] and slow["times"]
    assert quick["times"][0] < slow["times"][0]
    # the terminal shows each reply with every slot's KV use: the short one first (the long
    # prompt was still being read), then the long one, whose slot holds its prompt
    lines = [line for line in err.splitlines() if line.startswith("reply in slot")]
    assert len(lines) == 2, err
    short, long = lines
    assert "4 generated" in short and "8 generated" in long, lines
    for line in lines:
        kv = line.split("| KV ")[1]
        assert re.fullmatch(r"slot 0 \d+/2048( writing)? · slot 1 \d+/2048( writing)?", kv), kv
    slot = int(long.split()[3].rstrip(":"))
    used = int(long.split("| KV ")[1].split(" · ")[slot].split()[2].split("/")[0])
    assert used > 1500, long


def test_the_plan_for_parallel_slots_is_what_llama_cpp_allocates(smollm2: Path) -> None:
    """Four slots share the context: the plan (KV per slot, the compute buffer for the
    batch of four) equals llama.cpp's own report per device and on the host."""

    async def load() -> tuple[Any, int]:
        session = ChatSession(agents.addresses)
        try:
            result = await session.open(LoadSettings(model=smollm2, n_ctx=4096, parallel=4))
            return result, session.slots
        finally:
            await session.close()

    with LocalAgents(2) as agents:
        result, slots = asyncio.run(load())
    assert slots == 4
    comparison = result.comparison
    assert comparison is not None
    for name, planned, actual in zip(
        comparison.names, comparison.planned, comparison.actual, strict=True
    ):
        off = abs(planned.total - actual.total)
        assert off <= max(0.01 * actual.total, 2 * MiB), (name, planned, actual)


def test_a_request_that_fails_in_the_model_fails_alone(server: str) -> None:
    """A schema llama.cpp's grammar cannot be made from is a 400 naming response_format,
    while another client's reply streams on to its last token."""
    client = openai.OpenAI(base_url=server, api_key="x", max_retries=0, timeout=300)
    kept: dict = {}
    other = threading.Thread(target=_timed_stream, args=(client, _COUNT, 96, kept))
    other.start()
    while not kept.get("times"):
        time.sleep(0.02)
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=MODEL,
            max_tokens=8,
            messages=[{"role": "user", "content": "hi"}],
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"$ref": "#/$defs/missing"}},
            },
        )
    assert isinstance(refused.value.body, dict) and refused.value.body["param"] == "response_format"
    other.join(300)
    assert kept["finish"] == "length" and kept["usage"].completion_tokens == 96
