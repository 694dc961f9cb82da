"""The hand-over's guard: it is used only where ggml-rpc sends through the calls it seals."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from corral.engine.ggml.elfsyms import ElfError, imported_functions
from corral.engine.security.tunnel import _ggml_rpc_library, unguarded_sends


def test_the_installed_ggml_rpc_sends_only_through_send_and_recv() -> None:
    lib = _ggml_rpc_library()
    assert lib is not None, "llama-cpp-python with RPC is installed by make test"
    imported = imported_functions(lib)
    assert {"send", "recv", "connect", "accept"} <= imported  # what the shim interposes
    assert unguarded_sends(str(lib)) == ()


@pytest.mark.skipif(shutil.which("gcc") is None, reason="no C compiler here")
def test_a_library_that_writes_past_the_shim_turns_the_hand_over_off(tmp_path: Path) -> None:
    src = tmp_path / "sender.c"
    src.write_text(
        "#include <sys/uio.h>\n#include <sys/socket.h>\n"
        "long out(int fd, struct iovec *v) { return writev(fd, v, 2); }\n"
        "long msg(int fd, struct msghdr *m) { return sendmsg(fd, m, 0); }\n"
        "long plain(int fd, char *b) { return send(fd, b, 1, 0); }\n"
    )
    lib = tmp_path / "libsender.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    assert unguarded_sends(str(lib)) == ("sendmsg", "writev")
    (tmp_path / "junk.so").write_bytes(b"\x7fELF" + b"\0" * 60)
    assert unguarded_sends(str(tmp_path / "junk.so"))[0].startswith("unreadable")
    with pytest.raises(ElfError):
        imported_functions(src)
