"""Which llama.cpp build this host runs: hosts must agree, or RPC aborts at handshake."""

from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass
from pathlib import Path

from ._lib import load
from .errors import GgmlUnavailable


@dataclass(frozen=True, slots=True)
class BuildInfo:
    llama_cpp_python: str  # e.g. "0.3.36"
    ggml_version: str
    ggml_commit: str
    rpc_proto: str  # "major.minor.patch" this build's RPC client and server speak
    supports_rpc: bool
    system_info: str


def _rpc_proto(lib_dir: Path) -> str:
    # The version is a header macro, not an exported symbol; the wheel ships the headers.
    # pip puts the headers in site-packages/include, beside the llama_cpp package
    for header in (
        lib_dir.parent.parent / "include" / "ggml-rpc.h",
        lib_dir.parent / "include" / "ggml-rpc.h",
    ):
        if header.exists():
            text = header.read_text(errors="replace")
            parts = [
                re.search(rf"#define\s+RPC_PROTO_{p}_VERSION\s+(\d+)", text)
                for p in ("MAJOR", "MINOR", "PATCH")
            ]
            if all(parts):
                return ".".join(m.group(1) for m in parts if m)
    return ""


def build_info() -> BuildInfo:
    """Versions and capabilities of the installed llama.cpp."""
    g = load()

    def text(name: str) -> str:
        try:
            value: bytes | None = g.fn(name, ctypes.c_char_p)()
        except GgmlUnavailable:
            return ""
        return (value or b"").decode(errors="replace")

    return BuildInfo(
        llama_cpp_python=str(getattr(g.llama, "__version__", "")),
        ggml_version=text("ggml_version"),
        ggml_commit=text("ggml_commit"),
        rpc_proto=_rpc_proto(g.lib_dir),
        supports_rpc=bool(g.llama.llama_supports_rpc()),
        system_info=(g.llama.llama_print_system_info() or b"").decode(errors="replace").strip(),
    )


# Members of std::locale and std::ios_base: classes, not templates, so their code exists only
# in the C++ runtime itself. A library that defines and exports them carries its own copy of
# libstdc++ (linked statically, with its symbols left visible).
_CXX_RUNTIME_PREFIXES = ("_ZNSt6locale", "_ZNKSt6locale", "_ZNSt8ios_base")

OWN_CXX_RUNTIME_FIX = (
    "rebuild llama-cpp-python with a compiler that links the C++ runtime dynamically, e.g. "
    "the system's: `CC=/usr/bin/gcc CXX=/usr/bin/g++ python packaging/install_llama.py` "
    "(docs/CPU-KERNELS.md)"
)


def own_cxx_runtimes(folder: Path | None = None) -> list[str]:
    """The llama.cpp libraries in `folder` (default: the installed build's) that carry and
    export their own C++ runtime. With more than one such copy in a process, libllama calls
    a std::ostream of one library with the locale of another and dies loading any model
    (SIGSEGV in llama_model::print_info): seen with a toolchain that links libstdc++
    statically (/opt/gcc/bin/g++ on an H200 image; docs/CPU-KERNELS.md)."""
    from corral.engine.ggml.elfsyms import ElfError, exported_symbols

    from ._lib import installed_lib_dir

    folder = folder if folder is not None else installed_lib_dir()
    if folder is None or not folder.is_dir():
        return []
    found = []
    for lib in sorted(folder.glob("lib*.so")):
        try:
            names = exported_symbols(lib.resolve())
        except (OSError, ElfError):
            continue
        if any(n.startswith(_CXX_RUNTIME_PREFIXES) for n in names):
            found.append(lib.name)
    return found
