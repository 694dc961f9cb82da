"""The desktop and the agent cap glibc's malloc arenas: threads that come and go (the tunnel
pumps) then share two arenas instead of leaving one each behind (engine/procs.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

_THREADS = """
import ctypes, sys, threading
from corral.engine.procs import cap_malloc_arenas
if sys.argv[1] == "capped":
    assert cap_malloc_arenas()
together = threading.Barrier(8)
def work():
    keep = [bytearray(4096) for _ in range(64)]  # malloc'd, in this thread's arena
    together.wait()
ts = [threading.Thread(target=work) for _ in range(8)]
for t in ts: t.start()
for t in ts: t.join()
ctypes.CDLL(None).malloc_stats()  # one "Arena N:" block per arena, on stderr
"""


def _arenas(mode: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", _THREADS, mode], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return sum(line.startswith("Arena ") for line in done.stderr.splitlines())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_eight_threads_share_two_arenas_once_capped() -> None:
    assert _arenas("free") > 2  # glibc's default: an arena per thread, up to 8 per core
    assert _arenas("capped") <= 2
