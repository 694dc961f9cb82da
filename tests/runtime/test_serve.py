"""`corral serve`: the official openai client streams a chat from the split model."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from corral.engine.localagents import LocalAgents


@pytest.fixture(scope="module")
def server(smollm2: Path) -> Iterator[str]:
    with LocalAgents(2) as agents:
        args = [
            sys.executable,
            "-m",
            "corral.engine.cli",
            "serve",
            str(smollm2),
            "--port",
            "0",
            "--api-key",
            "sekret",
            "--ctx",
            "2048",
        ]
        for a in agents.addresses:
            args += ["--agent", a]
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line.startswith("serving"), line + (proc.stderr.read() if proc.stderr else "")
            yield line.split()[-1]
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


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
            "messages": [{"role": "user", "content": "Count from one to one thousand."}],
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
