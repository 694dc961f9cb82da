"""Processes that run llama.cpp's native code. What a user is shown of one llama.cpp
aborted: ggml's own message, not the native backtrace after it nor faulthandler's thread
list (the aborts here are ggml's real ggml_abort in a real child, with gdb on the path, and
without: execinfo's backtrace). And how long their OpenMP threads spin (procs.omp_env)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from corral.engine.procs import last_words

ABORT_LINE = "/src/ggml/ggml-rpc.cpp:579: GGML_ASSERT(status) failed"

# what the inference child does: faulthandler on, llama.cpp's ggml mapped, then an abort
CHILD = textwrap.dedent(
    """
    import ctypes, faulthandler
    faulthandler.enable()
    from corral.engine.ggml._lib import load
    abort = load().fn("ggml_abort", None, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p)
    print("llama_model_loader: loaded meta data", flush=True)
    abort(b"/src/ggml/ggml-rpc.cpp", 579, b"GGML_ASSERT(status) failed")
    """
)


def _abort_output(path: str) -> list[str]:
    env = dict(os.environ, PATH=path)
    env.pop("GGML_NO_BACKTRACE", None)
    done = subprocess.run(  # one pipe for both, in the order written, as the child's log
        [sys.executable, "-c", CHILD],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=120,
    )
    assert done.returncode < 0, done.stdout[-2000:]  # killed by a signal: abort()
    return done.stdout.splitlines()


@pytest.mark.parametrize("backtrace", ["gdb", "execinfo"])
def test_ggml_abort_message_is_what_is_kept(backtrace: str) -> None:
    if backtrace == "gdb":
        gdb = shutil.which("gdb")
        if gdb is None:
            pytest.skip("no gdb on this machine: ggml prints execinfo's backtrace (other case)")
        path = os.path.dirname(gdb)
    else:
        path = "/nonexistent"  # neither gdb nor lldb: ggml falls back to backtrace_symbols
    lines = _abort_output(path)
    assert ABORT_LINE in lines
    assert any(line.startswith("Fatal Python error") for line in lines)
    words = last_words(lines)
    assert words[-1] == ABORT_LINE
    assert "llama_model_loader: loaded meta data" in words
    assert not any(w.lstrip().startswith(("File ", "#", "Extension modules")) for w in words)


def test_a_crash_without_an_abort_line_keeps_what_came_before_the_dump() -> None:
    lines = [
        "load_tensors: offloaded 30/31 layers",
        "",
        "Fatal Python error: Segmentation fault",
        "",
        "Current thread 0x00007f (most recent call first):",
        '  File "child.py", line 253 in _construct',
    ]
    assert last_words(lines) == ["load_tensors: offloaded 30/31 layers"]


def test_an_uncaught_cxx_exception_keeps_its_what() -> None:
    lines = [
        "llama_context: n_ctx = 512",
        "terminate called after throwing an instance of 'std::runtime_error'",
        "  what():  unable to allocate CUDA0 buffer",
        "Fatal Python error: Aborted",
    ]
    assert last_words(lines, 2) == lines[1:3]


def test_a_worker_log_shows_its_last_run_only(tmp_path) -> None:
    """The agent appends each start of its RPC worker to one log: a worker that failed to
    start after an abort is shown its own failure, not the abort before it."""
    from corral.engine.agent.supervisor import _RUN_MARK, _tail

    log = tmp_path / "rpc-worker.log"
    log.write_text(
        f"{_RUN_MARK}--endpoint 127.0.0.1:50052\n"
        f"{ABORT_LINE}\n#0  0x00007f in __GI___wait4 ()\n[Inferior 1 (process 7) detached]\n"
        f"{_RUN_MARK}--endpoint 127.0.0.1:50052\n"
        "could not open 127.0.0.1:50052: address in use\n"
    )
    assert _tail(log) == ("could not open 127.0.0.1:50052: address in use",)
    with log.open("a") as f:
        f.write(f"{_RUN_MARK}--endpoint 127.0.0.1:50053\nstarting\n{ABORT_LINE}\n#0  0x7f in x\n")
    assert _tail(log) == ("starting", ABORT_LINE)
    assert _tail(log, raw=True)[-1] == "#0  0x7f in x"


def test_the_inference_child_spins_as_the_agents_workers_do(monkeypatch) -> None:
    """The desktop's inference child runs ggml's CPU backend too: it gets rpc_spin's default
    spin count (procs.omp_env), read from the running child's environment."""
    import asyncio
    from pathlib import Path

    from corral.engine.procs import OMP_SPIN_DEFAULT
    from corral.engine.runtime.inference import InferenceProcess

    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)

    async def child_env() -> dict[str, str]:
        child = InferenceProcess()
        try:
            await child.start()
            assert child.proc is not None
            raw = Path(f"/proc/{child.proc.pid}/environ").read_bytes()
        finally:
            await child.close()
        return dict(kv.split("=", 1) for kv in raw.decode().split("\0") if "=" in kv)

    assert asyncio.run(child_env())["GOMP_SPINCOUNT"] == str(OMP_SPIN_DEFAULT)


def test_a_spin_count_without_openmp_is_said_to_do_nothing() -> None:
    """A llama.cpp built without OpenMP (ggml's own thread pool: a macOS build, say) ignores
    GOMP_SPINCOUNT: an rpc_spin in the config is warned about, not passed over in silence."""
    from corral.engine.doctor.checks import spin_check

    no_omp = "CPU : AVX2 = 1 | LLAMAFILE = 1 | REPACK = 1 |"
    check = spin_check(no_omp, 500, {})
    assert check.status == "warn" and "rpc_spin = 500 changes nothing here" in check.detail
    assert spin_check(no_omp, None, {}).status == "pass"
    omp = "CPU : AVX2 = 1 | OPENMP = 1 | REPACK = 1 |"
    check = spin_check(omp, None, {"GOMP_SPINCOUNT": "77"})
    assert "spin 77 times" in check.detail and "environment" in check.detail
