"""Other installs to check the doctor against, made for real from the installed ones.

`without_rpc`: a copy of the installed llama.cpp libraries whose RPC backend library is
replaced by one that registers no backend. libggml's only use of libggml-rpc is
`ggml_backend_rpc_reg()` at start-up; returning NULL there is exactly what a build made
without GGML_RPC looks like from outside: `llama_supports_rpc()` is false, and the RPC device
is missing. Selected with LLAMA_CPP_LIB_PATH, which llama-cpp-python honours.

`with_own_cxx_runtime`: the same, the stand-in compiled as C++ and linked as the toolchain of
an H200 image links (libstdc++ static, its symbols left exported): what makes every model
load crash where each llama.cpp library carries such a copy (docs/CPU-KERNELS.md).

`corral_of_version`: a second Corral install, the installed package copied with another
`__version__`; put first on PYTHONPATH, an agent started with it reports that version
because it is that install, not because of a test switch in the agent.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest

_STUB = "void *ggml_backend_rpc_reg(void) { return 0; }\n"


def installed_llama_lib() -> Path:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        pytest.fail("llama-cpp-python is not installed: run `make install`")
    return Path(spec.origin).parent / "lib"


def _with_stand_in_rpc(dest: Path, compiler: str, source: str, *flags: str) -> Path:
    """A copy of the installed llama.cpp lib folder whose libggml-rpc is built from
    `source` (C or C++ by the file name) with `compiler` and `flags`."""
    shutil.copytree(installed_llama_lib(), dest, symlinks=True)
    name, text = source.split("\n", 1)
    (dest / name).write_text(text)
    for lib in ("libggml-rpc.so.0", "libggml-rpc.so"):
        (dest / lib).unlink(missing_ok=True)
    out, soname = str(dest / "libggml-rpc.so.0"), "-Wl,-soname,libggml-rpc.so.0"
    subprocess.run(
        [compiler, "-shared", "-fPIC", *flags, soname, "-o", out, str(dest / name)],
        check=True,
        capture_output=True,
    )
    shutil.copy(dest / "libggml-rpc.so.0", dest / "libggml-rpc.so")
    return dest


def without_rpc(dest: Path) -> Path:
    """A llama.cpp lib folder like the installed one, but built as if without GGML_RPC."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("needs a C compiler to build the stand-in RPC library")
    return _with_stand_in_rpc(dest, cc, "no_rpc.c\n" + _STUB)


_CXX_STUB = """
#include <sstream>
#include <string>
extern "C" void *ggml_backend_rpc_reg(void) {
    std::ostringstream name;  // the C++ runtime in use, as llama.cpp's own code uses it
    name << "RPC" << 0L;
    return name.str().empty() ? nullptr : nullptr;
}
"""


def with_own_cxx_runtime(dest: Path) -> Path:
    """A llama.cpp lib folder whose libggml-rpc carries its own, exported C++ runtime."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.fail("needs a C++ compiler (make install builds llama.cpp with one)")
    return _with_stand_in_rpc(dest, cxx, "own_runtime.cpp\n" + _CXX_STUB, "-static-libstdc++")


def corral_of_version(dest: Path, version: str) -> Path:
    """A folder holding a copy of the installed `corral` package that says `version`."""
    spec = importlib.util.find_spec("corral")
    assert spec is not None and spec.origin is not None
    package = Path(spec.origin).parent
    shutil.copytree(package, dest / "corral", ignore=shutil.ignore_patterns("__pycache__"))
    init = dest / "corral" / "__init__.py"
    text = init.read_text()
    init.write_text(re.sub(r'__version__ = "[^"]*"', f'__version__ = "{version}"', text))
    return dest
