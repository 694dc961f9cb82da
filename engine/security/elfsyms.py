"""The functions a shared library imports, read from its ELF dynamic symbol table.

The hand-over (`_rpcshim.c`) seals ggml-rpc's traffic inside its send() and recv(). A
llama.cpp whose libggml-rpc.so wrote through another call (writev, sendmsg, sendfile,
io_uring, ...) would put plaintext on the wire past the shim. So before it hands anything
over, Corral reads which socket calls the library imports and turns the hand-over off if
any is one the shim does not interpose (engine.security.tunnel.unguarded_sends).
"""

from __future__ import annotations

import struct
from pathlib import Path

_SHT_DYNSYM = 11
_SHN_UNDEF = 0


class ElfError(ValueError):
    """Not an ELF64 little-endian shared library this reader understands."""


def imported_functions(path: str | Path) -> set[str]:
    """Names of the undefined (imported) symbols in the library's .dynsym."""
    data = Path(path).read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ElfError(f"{path} is not a 64-bit little-endian ELF file")
    try:
        shoff = struct.unpack_from("<Q", data, 0x28)[0]
        shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
        sections = [
            struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)
        ]
        names: set[str] = set()
        for _name, kind, _flags, _addr, off, size, link, _info, _align, entsize in sections:
            if kind != _SHT_DYNSYM or not entsize:
                continue
            str_off = sections[link][4]
            for at in range(off, off + size, entsize):
                st_name, _st_info, _other, st_shndx = struct.unpack_from("<IBBH", data, at)
                if st_shndx != _SHN_UNDEF or not st_name:
                    continue
                end = data.index(b"\0", str_off + st_name)
                names.add(data[str_off + st_name : end].decode(errors="replace").split("@")[0])
        return names
    except (struct.error, IndexError, ValueError) as exc:
        raise ElfError(f"{path}: damaged ELF tables ({exc})") from None
