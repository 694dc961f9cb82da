"""packaging/install_llama.py: the build flags it promises, and the wheel cache they key."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO

SCRIPT = REPO / "packaging" / "install_llama.py"


def _run(*args: str, env: dict[str, str] | None = None) -> str:
    out = subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60, env=env
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_no_amx_is_its_own_build() -> None:
    assert "-mno-amx-int8" in _run("--no-amx", "--print-args")
    assert "-mno-amx" not in _run("--print-args")
    assert _run("--no-amx", "--print-key") != _run("--print-key")  # another cached wheel


def test_another_compiler_is_its_own_build() -> None:
    """CC/CXX choose the compiler CMake builds with; a build made with another one (one that
    links the C++ runtime statically, say) is never taken for the default build."""
    plain = {k: v for k, v in os.environ.items() if k not in ("CC", "CXX")}
    default = _run("--print-key", env=plain)
    assert _run("--print-key", env={**plain, "CXX": "/opt/gcc/bin/g++"}) != default
    assert _run("--print-key", env={**plain, "CC": "clang"}) != default


@pytest.mark.skipif(shutil.which("gcc") is None, reason="no gcc on this machine")
def test_the_no_amx_flags_take_the_amx_kernels_out_of_a_native_build() -> None:
    """What --no-amx relies on: after -march=X the flags still leave the AMX macros (which
    ggml's AMX kernels are compiled under) undefined. Asked of an AMX CPU by name, so it
    holds on any x86-64 machine with a GCC that knows Sapphire Rapids."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from install_llama import NO_AMX_FLAGS
    finally:
        sys.path.pop(0)

    def amx_macros(*flags: str) -> list[str]:
        out = subprocess.run(
            ["gcc", "-march=sapphirerapids", *flags, "-dM", "-E", "-"],
            input="",
            capture_output=True,
            text=True,
        )
        if out.returncode != 0:
            pytest.skip(f"this gcc does not know -march=sapphirerapids: {out.stderr[:200]}")
        return [line for line in out.stdout.splitlines() if "__AMX" in line]

    assert amx_macros() != []
    assert amx_macros(*NO_AMX_FLAGS.split()) == []
