"""The functions a shared library imports and exports, read from its ELF dynamic symbols.

The hand-over (`_rpcshim.c`) seals ggml-rpc's traffic inside its send() and recv(). A
llama.cpp whose libggml-rpc.so wrote through another call (writev, sendmsg, sendfile,
io_uring, ...) would put plaintext on the wire past the shim. So before it hands anything
over, Corral reads which socket calls the library imports and turns the hand-over off if
any is one the shim does not interpose (engine.security.tunnel.unguarded_sends). The
doctor's C++ runtime check reads the exported symbols (engine.ggml.buildinfo).
"""

from __future__ import annotations

import struct
from pathlib import Path

_SHT_DYNSYM = 11
_SHN_UNDEF = 0
_STB_GLOBAL, _STB_WEAK = 1, 2


class ElfError(ValueError):
    """Not an ELF64 little-endian shared library this reader understands."""


def imported_functions(path: str | Path) -> set[str]:
    """Names of the undefined (imported) symbols in the library's .dynsym."""
    return dynamic_symbols(path)[0]


def exported_symbols(path: str | Path) -> set[str]:
    """Names of the symbols the library defines and exports (its .dynsym, defined ones)."""
    return dynamic_symbols(path)[1]


def dynamic_symbols(path: str | Path) -> tuple[set[str], set[str]]:
    """(imported, exported) names of the library's .dynsym."""
    data = Path(path).read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ElfError(f"{path} is not a 64-bit little-endian ELF file")
    try:
        shoff = struct.unpack_from("<Q", data, 0x28)[0]
        shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
        sections = [
            struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)
        ]
        imported: set[str] = set()
        exported: set[str] = set()
        for _name, kind, _flags, _addr, off, size, link, _info, _align, entsize in sections:
            if kind != _SHT_DYNSYM or not entsize:
                continue
            str_off = sections[link][4]
            for at in range(off, off + size, entsize):
                st_name, st_info, _other, st_shndx = struct.unpack_from("<IBBH", data, at)
                if not st_name:
                    continue
                end = data.index(b"\0", str_off + st_name)
                name = data[str_off + st_name : end].decode(errors="replace").split("@")[0]
                if st_shndx == _SHN_UNDEF:
                    imported.add(name)
                elif st_info >> 4 in (_STB_GLOBAL, _STB_WEAK):
                    exported.add(name)
        return imported, exported
    except (struct.error, IndexError, ValueError) as exc:
        raise ElfError(f"{path}: damaged ELF tables ({exc})") from None
