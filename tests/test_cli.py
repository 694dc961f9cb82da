"""Bad input to the command line gets a clear message and an exit code, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import corral


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (["chat", "--agent", "nohostport:"], "is not HOST:PORT"),
        (["chat", "--agent", "host:99999"], "is not HOST:PORT"),
        (["chat", "--max-tokens", "0"], "must be greater than 0"),
        (["chat", "--ctx", "lots"], "is not a whole number"),
        (["chat", "--ctx", "8"], "use --ctx 256 or more"),
        (["plan", "--ctx", "99999999999999999999"], "use a smaller --ctx"),
        (["serve", "--ctx", str(2**31)], "use a smaller --ctx"),
        (["agents"], "--agent"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_usage_errors_exit_2_with_a_reason(args: list[str], expect: str) -> None:
    done = corral(*args)
    assert done.returncode == 2
    assert expect in done.stderr
    assert "Traceback" not in done.stderr


def test_missing_model_file(tmp_path: Path) -> None:
    done = corral("chat", str(tmp_path / "nope.gguf"), "--prompt", "hi")
    assert done.returncode == 1
    assert "no model file at" in done.stderr and "Traceback" not in done.stderr


def test_a_file_that_is_not_gguf(tmp_path: Path) -> None:
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"PK\x03\x04 this is a zip")
    done = corral("chat", str(bogus), "--prompt", "hi", "--json")
    assert done.returncode == 1
    assert json.loads(done.stdout)["message"].endswith("is not a GGUF model file")


def test_a_truncated_gguf_is_refused_by_the_child_not_the_parent(
    tmp_path: Path, tiny_model: Path
) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(tiny_model.read_bytes()[:5000])
    done = corral("chat", str(broken), "--prompt", "hi", "--json")
    assert done.returncode == 1
    event = json.loads(done.stdout.strip().splitlines()[-1])
    assert event["type"] == "error" and event["message"]
    assert "Traceback" not in done.stderr


def test_a_model_cut_at_half_says_so_and_what_to_do(tmp_path: Path, smollm2: Path) -> None:
    data = smollm2.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) // 2])
    done = corral("chat", str(cut), "--prompt", "hi", "--json")
    assert done.returncode == 1
    message = json.loads(done.stdout.strip().splitlines()[-1])["message"]
    assert "the file is cut short" in message and "download it again" in message, message
    assert f"{len(data) // 2:,} bytes" in message


def test_damaged_weights_are_found_when_they_load(tmp_path: Path, smollm2: Path) -> None:
    """1000 bytes overwritten in the tensor data: the scales there read as NaN, and the load
    (llama.cpp's check of every tensor) names the tensor instead of a model that replies
    nothing."""
    data = bytearray(smollm2.read_bytes())
    at = len(data) * 3 // 4
    data[at : at + 1000] = b"\xff" * 1000  # 0xffff: NaN as an f16 scale
    damaged = tmp_path / "damaged.gguf"
    damaged.write_bytes(bytes(data))
    done = corral("chat", str(damaged), "--prompt", "hi", "--json")
    assert done.returncode == 1, done.stdout[-2000:]
    message = json.loads(done.stdout.strip().splitlines()[-1])["message"]
    assert "the model file is damaged: tensor blk." in message, message
    assert "download it again" in message and "Traceback" not in done.stderr


def test_local_chat_streams_tokens_kv_and_done(smollm2: Path) -> None:
    done = corral("chat", "--prompt", "Say hello.", "--max-tokens", "8", "--json")
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines()]
    kinds = {e["type"] for e in events}
    assert kinds == {"token", "kv", "done"}
    last = events[-1]
    assert last["type"] == "done" and last["content"] == "".join(
        e["text"] for e in events if e["type"] == "token"
    )
    assert last["devices"][0]["device"] == "CPU" and last["kv"]["n_ctx"] == 2048


def test_sampling_with_a_seed_is_reproducible(smollm2: Path) -> None:
    args = [
        "chat",
        "--prompt",
        "Tell me a word.",
        "--max-tokens",
        "12",
        "--temp",
        "0.9",
        "--seed",
        "42",
        "--json",
    ]
    first, second = corral(*args), corral(*args)
    assert first.returncode == second.returncode == 0
    assert (
        json.loads(first.stdout.splitlines()[-1])["content"]
        == json.loads(second.stdout.splitlines()[-1])["content"]
    )


def test_a_silent_program_at_the_port_is_told_apart_from_an_unreachable_host() -> None:
    """A listener that accepts and says nothing (not an agent, or a stopped one) is named as
    such, not as a host that did not accept the connection."""
    import socket

    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        done = corral("agents", "--agent", f"127.0.0.1:{port}")
    assert done.returncode == 1, done.stderr
    assert "accepted the connection but said nothing" in done.stderr, done.stderr
    assert "did not accept a connection" not in done.stderr and "Traceback" not in done.stderr
