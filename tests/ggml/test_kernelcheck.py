"""The CPU-kernel self-test: real llama.cpp in real children, and children that die for real
(SIGSEGV, SIGILL) or answer wrong logits on one weight type's fast path."""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.engine.ggml import GgmlError
from corral.engine.ggml.buildinfo import own_cxx_runtimes
from corral.engine.ggml.kernelcheck import (
    CRASHED,
    ENV_SWITCH,
    EXTRA,
    OK,
    PLAIN,
    WEIGHT_TYPES,
    WRONG,
    CpuKernels,
    cache_dir,
    cached_verdict,
    crash_hint,
    decide,
    extra_buffers_setting,
    host_key,
    known_extra_factors,
    run_selftest,
)
from corral.engine.ggml.quantize import quantize
from corral.engine.model.synthetic import TinyLlama, write_tiny_llama
from corral.engine.runtime.childproto import Token
from tests.conftest import corral
from tests.support.builds import with_own_cxx_runtime

FAULTY = (sys.executable, "-m", "tests.support.kernel_faults")


@pytest.fixture(autouse=True)
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Each test decides for itself: its own verdict cache, no switch set."""
    monkeypatch.setenv("CORRAL_KERNELCHECK_DIR", str(tmp_path / "kernelcheck"))
    monkeypatch.delenv(ENV_SWITCH, raising=False)
    yield tmp_path / "kernelcheck"


def test_this_host_runs_every_type_on_both_paths() -> None:
    verdict = run_selftest()
    assert {(r.wtype, r.path) for r in verdict.results} == {
        (t, p) for t in WEIGHT_TYPES for p in (PLAIN, EXTRA)
    }
    assert not verdict.error
    # the plain kernels are right on any machine that runs these tests; whether the extra
    # buffers are is what the self-test is for, so only its consistency is asserted
    assert verdict.failures(PLAIN) == []
    assert verdict.extra_buffers == (verdict.failures(EXTRA) == [])
    assert cached_verdict() == verdict  # kept for this build and CPU
    stored = cache_dir() / f"{host_key()}.json"
    assert stored.stat().st_mode & 0o077 == 0  # the user's own


def _genuine_failures() -> set[str]:
    """Weight types whose extra-buffer kernels fail on this host by themselves (an AMX VM
    whose kernels die with SIGILL): a fault injected there cannot be told from them."""
    return {r.wtype for r in run_selftest().failures()}


@pytest.mark.parametrize(
    ("mode", "signame", "victim"), [("segv", "SIGSEGV", "q4_0"), ("sigill", "SIGILL", "q4_k_s")]
)
def test_a_fast_kernel_that_crashes_turns_the_extra_buffers_off(
    mode: str, signame: str, victim: str
) -> None:
    genuine = _genuine_failures()
    verdict = run_selftest(child=(*FAULTY, mode, victim))
    bad = verdict.failures()
    assert not verdict.extra_buffers
    assert len(verdict.results) == 2 * len(WEIGHT_TYPES)
    assert verdict.summary().endswith("turned off")
    if genuine:  # this host's own extra kernels fail too (an AMX VM): the victim is among them
        assert any(r.wtype == victim and r.outcome == CRASHED for r in bad), bad
        assert {r.wtype for r in bad} >= genuine
    else:
        assert [(r.wtype, r.path, r.outcome, r.detail) for r in bad] == [
            (victim, EXTRA, CRASHED, f"killed by {signame}")
        ]
        # the types after the crash ran too, in a new child
        assert all(r.outcome == OK for r in verdict.results if r.wtype != victim)
        assert f"{victim} killed by {signame}" in verdict.summary()
    # every load on this host follows the cached verdict from now on
    assert extra_buffers_setting() == CpuKernels(False, verdict.summary(), degraded=True)


def test_a_fast_kernel_that_answers_wrong_turns_them_off() -> None:
    genuine = _genuine_failures()
    verdict = run_selftest(child=(*FAULTY, "wrong", "q8_0"))
    if "q8_0" in genuine:  # this host's own q8_0 kernel fails first: it stays off
        assert not verdict.extra_buffers
        assert any(r.wtype == "q8_0" for r in verdict.failures())
        return
    [bad] = [r for r in verdict.failures() if r.wtype not in genuine]
    assert (bad.wtype, bad.path, bad.outcome) == ("q8_0", EXTRA, WRONG)
    assert "off the plain kernels'" in bad.detail and bad.off_plain is not None
    assert bad.off_plain > 0.5  # reversed logits: nothing like the model's
    assert not verdict.extra_buffers


def test_a_self_test_that_cannot_run_decides_nothing() -> None:
    """A child that dies before the F32 reference: nothing is known, and nothing cached
    (the next load asks again), while the load takes the plain kernels meanwhile."""
    verdict = run_selftest(child=(sys.executable, "-c", "import os; os.abort()"))
    assert verdict.error and "killed by SIGABRT" in verdict.error
    assert cached_verdict() is None


def test_why_the_self_test_could_not_run_is_said_in_words() -> None:
    """A native crash says which signal, not faulthandler's list of extension modules; a
    child that exits with an error says its exception."""
    segv = "import faulthandler, ctypes, numpy; faulthandler.enable(); ctypes.string_at(0)"
    verdict = run_selftest(child=(sys.executable, "-c", segv))
    assert verdict.error and "killed by SIGSEGV" in verdict.error
    assert "numpy" not in verdict.error and "Extension modules" not in verdict.error
    raises = "raise SystemExit('the model folder is read-only')"
    verdict = run_selftest(child=(sys.executable, "-c", raises))
    assert verdict.error and "exit code 1: the model folder is read-only" in verdict.error


def test_the_rules_for_right_and_wrong() -> None:
    """decide() with the figures of docs/CPU-KERNELS.md: a repacked Q4_0 1.1 % off the plain
    kernels passes, a kernel as far off as the weight rounding itself does not."""
    types = ["q4_0", "q8_0", "f16"]
    plain = {"q4_0": ("", 0.367), "q8_0": ("", 0.031), "f16": ("killed by SIGSEGV", None)}
    extra = {
        "q4_0": ("", 0.366, 0.011),
        "q8_0": ("", 0.06, 0.05),
        "f16": ("", 0.002, None),
    }
    got = {(r.wtype, r.path): r for r in decide(types, plain, extra, {"q4_0": ("AMX",)})}
    assert got["q4_0", EXTRA].outcome == OK and got["q4_0", EXTRA].buffers == ("AMX",)
    assert got["q8_0", EXTRA].outcome == WRONG  # 5 % off where 3 % is allowed
    assert got["f16", PLAIN].outcome == CRASHED
    assert decide(["q4_0"], {"q4_0": ("", 0.95)}, extra, {})[0].outcome == WRONG  # garbage


def test_the_switch_overrides_the_self_test_and_refuses_nonsense(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(ENV_SWITCH, "off")
    assert extra_buffers_setting().extra_buffers is False
    monkeypatch.setenv(ENV_SWITCH, "on")
    assert extra_buffers_setting().extra_buffers is True
    assert cached_verdict() is None  # neither ran the self-test
    monkeypatch.setenv(ENV_SWITCH, "fast")
    with pytest.raises(GgmlError, match=f"{ENV_SWITCH}='fast' is not a setting: use auto"):
        extra_buffers_setting()


def test_a_damaged_cache_is_asked_again(own_cache: Path) -> None:
    own_cache.mkdir(parents=True)
    for junk in ("{not json", "[]", json.dumps({"format": 1, "key": host_key(), "odd": 1})):
        (own_cache / f"{host_key()}.json").write_text(junk)
        assert cached_verdict() is None


def test_crash_hints_name_the_kernels_in_play() -> None:
    amx_load = [
        "load_tensors:          AMX model buffer size =    89.02 MiB",
        "load_tensors:   CPU_Mapped model buffer size =   111.00 MiB",
        "Fatal Python error: Segmentation fault",
        '  File "/x/corral/engine/runtime/child.py", line 512 in _decode',
        '  File "/x/corral/engine/runtime/child.py", line 470 in step',
        '  File "/x/corral/engine/runtime/child.py", line 455 in run_step',
        '  File "/x/corral/engine/runtime/child.py", line 600 in main',
    ]
    hint = crash_hint("killed by SIGSEGV", amx_load)
    assert "ggml's AMX CPU kernels while computing a reply" in hint
    assert "`corral doctor`" in hint and f"{ENV_SWITCH}=off" in hint
    plain = crash_hint("killed by SIGILL", ["CUDA0 model buffer size = 10.00 MiB"])
    assert "an instruction this CPU lacks" in plain and "--portable" in plain
    assert crash_hint("killed by SIGABRT", amx_load) == ""  # llama.cpp's own abort: not this
    assert crash_hint("exit code 1", amx_load) == ""


@pytest.fixture(scope="module")
def q4_0_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pure Q4_0 model of a shape every extra buffer type takes (as the self-test's)."""
    folder = tmp_path_factory.mktemp("kernels")
    f32 = write_tiny_llama(
        folder / "f32.gguf",
        TinyLlama(n_layer=2, n_embd=256, n_head=4, n_head_kv=2, n_ff=512, n_vocab=384),
    )
    return quantize(f32, folder / "q4_0.gguf", "q4_0", pure=True)


def _chat(model: Path) -> dict[str, object]:
    out = corral("chat", str(model), "--prompt", "hello", "--max-tokens", "4", "--json")
    assert out.returncode == 0, out.stderr
    done: dict[str, object] = json.loads(out.stdout.splitlines()[-1])
    assert done["type"] == "done"
    return done


def test_a_build_with_its_own_cxx_runtime_is_named_in_the_crash_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The installed build links the C++ runtime dynamically; a folder whose libggml-rpc
    carries its own (an H200 image's toolchain) is named, with the rebuild."""
    assert own_cxx_runtimes() == []
    folder = with_own_cxx_runtime(tmp_path / "lib")
    assert own_cxx_runtimes(folder) == ["libggml-rpc.so"]
    monkeypatch.setenv("LLAMA_CPP_LIB_PATH", str(folder))
    hint = crash_hint("killed by SIGSEGV", [])
    assert "libggml-rpc.so" in hint and "own copy of the C++ runtime" in hint
    assert "CXX=/usr/bin/g++" in hint
    assert "C++ runtime" not in crash_hint("killed by SIGILL", [])


def test_the_instant_plan_knows_the_extra_buffers_only_from_a_cached_verdict(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """known_extra_factors never runs the self-test: nothing cached, nothing known; a cached
    verdict that keeps the buffers gives its factors; the switch's off gives none."""
    assert known_extra_factors() == {}
    found = run_selftest()  # cached for this build and CPU (this test's own cache)
    assert known_extra_factors() == (found.extra_factors() if found.extra_buffers else {})
    monkeypatch.setenv(ENV_SWITCH, "off")
    assert known_extra_factors() == {}


def test_a_local_chat_follows_the_verdict(q4_0_model: Path) -> None:
    """A load uses exactly the extra CPU buffers the self-test saw work, and none once a
    kernel has failed: the cached verdict decides for every later load on the host."""
    passed = run_selftest()
    if passed.extra_buffers:
        seen = next(r.buffers for r in passed.results if r.wtype == "q4_0" and r.path == EXTRA)
        assert _chat(q4_0_model)["cpu_kernels"] == {
            "verdict": passed.summary(),
            "buffers": list(seen),
        }
    failed = run_selftest(child=(*FAULTY, "segv", "q4_0"))
    done = _chat(q4_0_model)
    assert done["cpu_kernels"] == {"verdict": failed.summary(), "buffers": []}
    human = corral("chat", str(q4_0_model), "--prompt", "hello", "--max-tokens", "2")
    assert "warning: CPU kernels: llama.cpp's extra CPU buffers" in human.stderr
    assert "): turned off; `corral doctor` says more" in human.stderr
    assert "q4_0 killed by SIG" in human.stderr  # SIGSEGV, or this host's own SIGILL


def test_a_native_crash_of_the_inference_process_points_at_the_doctor(q4_0_model: Path) -> None:
    """The inference process dies by SIGSEGV mid-reply: the message names what the load put
    in play and the command to run, not a bare signal."""
    import asyncio

    from corral.engine.runtime.errors import InferenceCrashed
    from corral.engine.runtime.session import ChatSession, LoadSettings

    async def run() -> str:
        session = ChatSession([])
        try:
            await session.open(LoadSettings(model=q4_0_model, n_ctx=2048))
            assert session.child.proc is not None
            try:
                async for frame in session.ask("hello", max_tokens=1000, ignore_eos=True):
                    if isinstance(frame, Token):
                        os.kill(session.child.proc.pid, signal.SIGSEGV)
            except InferenceCrashed as crash:
                return str(crash)
            raise AssertionError("the reply ended without the crash")
        finally:
            await session.close()

    message = asyncio.run(run())
    assert "killed by SIGSEGV" in message and "while computing a reply" in message
    assert "run `corral doctor`" in message


def test_the_plan_counts_the_extra_cpu_buffers(q4_0_model: Path) -> None:
    """The dry run logs the extra CPU buffers as empty; the plan sizes them from the
    self-test's factors, and a real load reports what was planned (none where the host
    has none, or once the self-test turned them off)."""
    import asyncio

    from corral.engine.planner.plan import MiB
    from corral.engine.runtime.session import ChatSession, LoadSettings

    async def host_extra() -> tuple[int, int]:
        session = ChatSession([])
        try:
            result = await session.open(LoadSettings(model=q4_0_model, n_ctx=512))
            assert result.comparison is not None
            return result.comparison.planned[-1].extra, result.comparison.actual[-1].extra
        finally:
            await session.close()

    passed = run_selftest()
    planned, actual = asyncio.run(host_extra())
    assert abs(planned - actual) <= max(0.02 * actual, 0.02 * MiB)  # the log's 0.01 MiB steps
    assert (actual > 0) == bool(passed.extra_factors())
    run_selftest(child=(*FAULTY, "wrong", "q4_0"))
    assert asyncio.run(host_extra()) == (0, 0)
