"""A CPU-kernel self-test child that fails for real on one weight type's extra path.

  python -m tests.support.kernel_faults MODE TYPE <the child's own arguments>

MODE is segv (reads address 0: a real SIGSEGV), sigill (runs an undefined instruction: a
real SIGILL, as a kernel built for instructions the CPU lacks does) or wrong (returns the
logits reversed: a kernel that answers garbage). Every other model runs the real code.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import signal
import sys
from pathlib import Path
from typing import Any

from corral.engine.ggml import _kernelcheck_child as child

# an undefined instruction, then a return: ud2 on x86-64, udf #0 on AArch64
_UNDEFINED = {"x86_64": b"\x0f\x0b\xc3", "aarch64": b"\x00\x00\x00\x00"}


def _illegal_instruction() -> None:
    code = _UNDEFINED.get(platform.machine())
    if code is not None:
        try:
            rwx = mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC
            page = mmap.mmap(-1, mmap.PAGESIZE, prot=rwx)
        except (OSError, AttributeError):  # W^X enforced: the signal itself is the next best
            page = None
        if page is not None:
            page.write(code)
            address = ctypes.addressof(ctypes.c_char.from_buffer(page))
            ctypes.CFUNCTYPE(None)(address)()
    os.kill(os.getpid(), signal.SIGILL)


def main() -> int:
    mode, victim, *argv = sys.argv[1:]
    real = child._logits

    def faulty(model_path: Path, extra: bool, threads: int) -> Any:
        if not (extra and model_path.stem == victim):
            return real(model_path, extra, threads)
        if mode == "segv":
            ctypes.string_at(0)
        elif mode == "sigill":
            _illegal_instruction()
        return real(model_path, extra, threads)[:, ::-1].copy()

    child._logits = faulty
    return child.main(argv)


if __name__ == "__main__":
    sys.exit(main())
