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
