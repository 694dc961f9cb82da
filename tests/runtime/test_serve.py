"""`corral serve`: the official openai client streams a chat from the split model."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from corral.engine.localagents import LocalAgents
from tests.support.agents import inventory, start_serve, stop


@pytest.fixture(scope="module")
def server(smollm2: Path) -> Iterator[str]:
    with LocalAgents(2) as agents:
        proc, url = start_serve(smollm2, agents.addresses, "--api-key", "sekret")
        try:
            yield url
        finally:
            stop(proc)


_LONG = "Write the numbers from 1 to 1000 separated by commas."  # SmolLM2: 1500 tokens and on
_BRIEF = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Name a colour."},
]


def test_openai_client_streams_a_chat(server: str) -> None:
    client = openai.OpenAI(base_url=server, api_key="sekret")
    assert [m.id for m in client.models.list()] == ["SmolLM2-135M-Instruct.Q4_1"]
    # Greedy replies are compared with the prompt cache in the same state: a prompt partly
    # reused from the cache is computed in other batch shapes, and on some CPUs the float
    # sums, and then a greedy token, differ (docs/CPU-KERNELS.md, "Float sums and the same
    # answer twice"). This request leaves the prompt cached; the two below each reuse the
    # same cells and compute only its last token.
    client.chat.completions.create(
        model="SmolLM2-135M-Instruct.Q4_1", max_tokens=16, temperature=0, messages=_BRIEF
    )
    stream = client.chat.completions.create(
        model="SmolLM2-135M-Instruct.Q4_1",
        stream=True,
        max_tokens=16,
        temperature=0,
        messages=_BRIEF,
    )
    parts = [c.choices[0].delta.content or "" for c in stream]
    text = "".join(parts)
    assert len(parts) > 3 and text.strip()
    whole = client.chat.completions.create(
        model="SmolLM2-135M-Instruct.Q4_1", max_tokens=16, temperature=0, messages=_BRIEF
    )
    assert whole.choices[0].message.content == text  # greedy: the same reply both ways
    assert whole.usage is not None and whole.usage.completion_tokens <= 16


def test_wrong_key_and_bad_requests(server: str) -> None:
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server, api_key="wrong").models.list()
    req = urllib.request.Request(
        server + "/chat/completions",
        data=b"{not json",
        headers={"Authorization": "Bearer sekret"},
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code == 400
    assert "not JSON" in json.loads(err.value.read())["error"]["message"]


def _colour(client: openai.OpenAI) -> tuple[str, int]:
    reply = client.chat.completions.create(
        model="SmolLM2-135M-Instruct.Q4_1",
        max_tokens=16,
        temperature=0,
        messages=[{"role": "user", "content": "Name a colour."}],
    )
    assert reply.usage is not None and reply.usage.completion_tokens <= 16
    return reply.choices[0].message.content or "", reply.usage.prompt_tokens


def test_a_client_that_leaves_mid_stream_costs_the_next_nothing(server: str) -> None:
    """A streaming client that hangs up stops its reply; the next request gets its own
    reply, not the rest of the abandoned one."""
    client = openai.OpenAI(base_url=server, api_key="sekret")
    _, colour_prompt = _colour(client)
    host, port = server.removeprefix("http://").split("/")[0].split(":")
    body = json.dumps(
        {
            "model": "SmolLM2-135M-Instruct.Q4_1",
            "stream": True,
            "max_tokens": 1500,
            "temperature": 0,
            "messages": [{"role": "user", "content": _LONG}],
        }
    ).encode()
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sekret\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        )
        seen = b""
        while seen.count(b"data: ") < 5:  # the reply is streaming
            got = s.recv(4096)
            assert got, seen
            seen += got
    abandoned = "".join(
        json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
        for line in seen.decode(errors="replace").splitlines()
        if line.startswith("data: {")
    )
    # The next request is answered as itself: its own prompt, at most its own 16 tokens
    # (the rest of the abandoned reply would count the other prompt's tokens and run on)
    text, prompt_tokens = _colour(client)
    assert prompt_tokens == colour_prompt
    assert abandoned.strip() and not text.startswith(abandoned)
    # and the cache is sound after it: asked again in the same cache state (the prompt's
    # cells reused, its last token computed alone), the same greedy reply twice
    assert _colour(client) == _colour(client)


# ---------------------------------------------------------------- faults and limits


def _long_stream(client: openai.OpenAI) -> Iterator[str]:
    stream = client.chat.completions.create(
        model="SmolLM2-135M-Instruct.Q4_1",
        stream=True,
        max_tokens=1500,
        temperature=0,
        messages=[{"role": "user", "content": _LONG}],
    )
    for c in stream:
        yield c.choices[0].delta.content or ""


def test_a_worker_killed_mid_stream_is_an_error_and_serve_heals(smollm2: Path) -> None:
    """The SDK raises (an error event, not a short reply that looks complete), and the next
    request is answered: serve loaded the model again on its own."""
    with LocalAgents(2) as agents:
        proc, url = start_serve(smollm2, agents.addresses)
        try:
            client = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=120)
            parts = _long_stream(client)
            with pytest.raises(openai.APIError, match="cut short"):
                for i, _ in enumerate(parts):
                    if i == 3:
                        os.kill(inventory(agents.addresses[0]).worker.pid, signal.SIGKILL)
            text, _ = _colour(client)  # waits for the reload, then answers
            assert text.strip()
        finally:
            _, err = stop(proc)
    assert "lost the model" in err and "reloaded over" in err, err[-3000:]
    assert "Traceback" not in err


def test_serve_stopped_mid_stream_ends_the_stream_with_an_error(smollm2: Path) -> None:
    with LocalAgents(1) as agents:
        proc, url = start_serve(smollm2, agents.addresses)
        try:
            client = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=120)
            with pytest.raises(openai.APIError, match="shutting down"):
                for i, _ in enumerate(_long_stream(client)):
                    if i == 3:
                        proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)  # it ends by itself (a second SIGTERM would find it half-gone)
        finally:
            _, err = stop(proc)
    assert proc.returncode == 0 and "Traceback" not in err, err[-3000:]


def test_the_queue_the_deadline_and_a_client_that_gives_up(smollm2: Path) -> None:
    with LocalAgents(1) as agents:
        proc, url = start_serve(smollm2, agents.addresses, "--queue", "1", "--deadline", "3")
        try:
            client = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=120)
            # a whole (not streamed) reply whose client gives up after 1 s is stopped
            impatient = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=1)
            with pytest.raises(openai.APITimeoutError):
                impatient.chat.completions.create(
                    model="SmolLM2-135M-Instruct.Q4_1",
                    max_tokens=1500,
                    temperature=0,
                    messages=[{"role": "user", "content": _LONG}],
                )
            # one reply runs, one waits, the third is refused at once with 429
            running = _long_stream(client)
            next(running)
            waiting = threading.Thread(target=lambda: _swallow(client), daemon=True)
            waiting.start()
            time.sleep(0.5)  # the second request is in the queue
            with pytest.raises(openai.RateLimitError, match="queue holds 1"):
                _colour(client)
            # the running one passes its 3 s deadline (1500 tokens over RPC take far longer)
            with pytest.raises(openai.APIError, match="deadline of 3 s"):
                for _ in running:
                    pass
            waiting.join(timeout=60)
        finally:
            _, err = stop(proc)
    assert "a client left before its reply: the reply is stopped" in err, err[-3000:]


def _swallow(client: openai.OpenAI) -> None:
    with contextlib.suppress(openai.APIError):
        _colour(client)
