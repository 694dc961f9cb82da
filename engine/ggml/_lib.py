"""Load the ggml shared libraries of the installed llama-cpp-python, once, and type them.

Load the ``.so.0`` files: they are the SONAMEs libllama links against, so dlopen returns the
copies already mapped. Loading ``libggml.so`` would map a second ggml with its own, empty
device registry, where registered RPC servers are silently ignored.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

from .errors import GgmlUnavailable

_LIB_NAMES = ("ggml", "ggml-base", "ggml-rpc", "ggml-cpu")


class Libs:
    """The loaded ggml libraries; ``fn(name)`` finds a symbol in whichever exports it."""

    def __init__(self, llama: Any, libs: dict[str, ctypes.CDLL], lib_dir: Path) -> None:
        self.llama = llama  # the llama_cpp module
        self.libs = libs
        self.lib_dir = lib_dir

    def fn(self, name: str, restype: Any, *argtypes: Any) -> Any:
        for lib in self.libs.values():
            try:
                f = getattr(lib, name)
            except AttributeError:
                continue
            f.restype = restype
            f.argtypes = list(argtypes)
            return f
        raise GgmlUnavailable(f"{name} is not exported by the ggml libraries in {self.lib_dir}")


def _lib_file(lib_dir: Path, name: str) -> Path | None:
    suffix = ".dylib" if sys.platform == "darwin" else ".so"
    for candidate in (
        lib_dir / f"lib{name}{suffix}.0" if suffix == ".so" else lib_dir / f"lib{name}.0{suffix}",
        lib_dir / f"lib{name}{suffix}",
    ):
        if candidate.exists():
            return candidate
    return None


def installed_lib_dir() -> Path | None:
    """The installed llama-cpp-python's lib folder (or LLAMA_CPP_LIB_PATH), found without
    importing it: for checks that must not map llama.cpp into their own process."""
    override = os.environ.get("LLAMA_CPP_LIB_PATH")
    if override:
        return Path(override)
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "lib"


@functools.cache
def load() -> Libs:
    """Import llama_cpp (which maps libllama and its ggml) and open the same ggml files."""
    try:
        import llama_cpp  # the one place outside the inference child that imports it
        import llama_cpp.llama_cpp as raw
    except ImportError as exc:
        raise GgmlUnavailable(
            f"llama-cpp-python is not installed ({exc}). Run `make .venv` in the Corral "
            "checkout, or `python packaging/install_llama.py`."
        ) from None
    lib_dir = installed_lib_dir() or Path(raw.__file__).parent / "lib"
    libs: dict[str, ctypes.CDLL] = {}
    for name in _LIB_NAMES:
        path = _lib_file(lib_dir, name)
        if path is not None:
            libs[name] = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    if "ggml" not in libs:
        raise GgmlUnavailable(f"no libggml in {lib_dir}: the llama-cpp-python install is broken")
    return Libs(llama_cpp, libs, lib_dir)
