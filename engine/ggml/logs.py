"""Capture llama.cpp's log: every line, at every level, also when verbose is off."""

from __future__ import annotations

import collections
import ctypes
import os
import threading
from collections.abc import Callable

from ._lib import load

_keep: list[object] = []  # the ctypes callback must outlive every call into llama.cpp


class LogCapture:
    """Collects llama.cpp log lines; optionally mirrors them to a file descriptor.

    Mirroring to stderr matters in the inference child: if llama.cpp aborts, lines held
    only in this process die with it, while the parent keeps what reached the pipe.
    """

    def __init__(self, mirror_fd: int | None = None, keep: int = 20000) -> None:
        self.lines: collections.deque[str] = collections.deque(maxlen=keep)
        self.count = 0  # lines seen so far, including those the deque has dropped
        self._partial = ""
        self._mirror_fd = mirror_fd
        self._lock = threading.Lock()
        self.on_line: Callable[[str], None] | None = None

    def _on_text(self, level: int, text: bytes | None, _user: object) -> None:
        chunk = (text or b"").decode(errors="replace")
        if self._mirror_fd is not None and chunk:
            try:
                os.write(self._mirror_fd, chunk.encode())
            except OSError:
                pass
        with self._lock:
            data = self._partial + chunk
            *done, self._partial = data.split("\n")
            self.lines.extend(done)
            self.count += len(done)
        if self.on_line is not None:
            for line in done:
                self.on_line(line)

    def install(self) -> None:
        """Route llama.cpp's and ggml's log into this capture."""
        llama = load().llama
        callback = llama.llama_log_callback(self._on_text)
        _keep.append(callback)
        llama.llama_log_set(callback, ctypes.c_void_p(0))

    def since(self, mark: int) -> list[str]:
        """Lines logged after `count` was `mark` (as many as are still kept)."""
        with self._lock:
            new = self.count - mark
            return list(self.lines)[-new:] if new > 0 else []
